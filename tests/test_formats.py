"""Points/tracks JSON parsing: every accepted form, and clear errors for bad input."""
import math

import pytest
import torch

from kinema.formats import load_json, parse_points, parse_tracks, tracks_to_json


def test_points_all_forms_agree():
    a = parse_points('[{"x": 10, "y": 20}, {"x": 30.5, "y": 40}]', size=(64, 64))
    b = parse_points("[[10, 20], [30.5, 40]]", size=(64, 64))
    c = parse_points('{"positive": [[10, 20], {"x": 30.5, "y": 40}], "negative": [], "box": null}', size=(64, 64))
    d = parse_points("[{'x': 10, 'y': 20}, {'x': 30.5, 'y': 40}]")  # single quotes, as some packs write
    for p in (a, b, c, d):
        assert torch.equal(p.positive, torch.tensor([[10.0, 20.0], [30.5, 40.0]]))
        assert p.negative.shape == (0, 2) and p.box is None


def test_points_negative_box_and_normalized():
    p = parse_points('{"positive": [[0.5, 0.5]], "negative": [[0.25, 0.75]], "box": [0.9, 0.8, 0.1, 0.2],'
                     ' "normalized": true}', size=(200, 100))
    assert p.positive.tolist() == [[100.0, 50.0]]
    assert p.negative.tolist() == [[50.0, 75.0]]
    assert p.box.tolist() == [20.0, 20.0, 180.0, 80.0]  # corners sorted
    q = parse_points("[[1, 2]]", negative_text='[{"x": 3, "y": 4}]')
    assert q.negative.tolist() == [[3.0, 4.0]] and q.count == 2


@pytest.mark.parametrize("text,match", [
    ("[[700, 20]]", r"points: \(700, 20\) is outside the 512x512 image"),
    ("[[1, 2", "points: not valid JSON"),
    ('[{"x": 1}]', "has no 'x' and 'y'"),
    ('[["a", 2]]', "not a number"),
    ("[[NaN, 2]]", "NaN or infinite"),
    ("[[Infinity, 2]]", "NaN or infinite"),
    ('{"positive": [[1, 2]], "box": [1, 2, 3]}', r"box must be \[x0, y0, x1, y1\]"),
    ("[5]", "is not a point"),
])
def test_points_errors_name_the_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_points(text, size=(512, 512))


def test_tracks_all_forms_agree():
    forms = [
        '[{"x": 1, "y": 2}, {"x": 5, "y": 6}]',                       # one track (SplineEditor)
        '[[{"x": 1, "y": 2}, {"x": 5, "y": 6}]]',                     # WanTrackToVideo
        "[[[1, 2], [5, 6]]]",                                          # plain
        '{"tracks": [[{"x": 1, "y": 2}, {"x": 5, "y": 6}]], "anchors": []}',  # Kinema editor
    ]
    for text in forms:
        t = parse_tracks(text, size=(10, 10))
        assert len(t) == 1 and torch.equal(t.tracks[0], torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
        assert t.anchors.shape == (0, 2)


def test_tracks_anchors_roundtrip_and_end_may_leave_image():
    t = parse_tracks('{"tracks": [[[1, 2], [50, 60], [-5, 3]]], "anchors": [{"x": 7, "y": 8}]}',
                     size=(10, 10), anchors_text="[[9, 9]]")
    assert t.anchors.tolist() == [[7.0, 8.0], [9.0, 9.0]]
    again = parse_tracks(tracks_to_json(t))
    assert torch.equal(again.tracks[0], t.tracks[0]) and torch.equal(again.anchors, t.anchors)


def test_empty_inputs_give_empty_results():
    assert len(parse_tracks("")) == 0 and len(parse_tracks("[]")) == 0
    assert parse_points("").count == 0


@pytest.mark.parametrize("text,match", [
    ("[[[1, 2]]]", "track 0 has 1 point"),
    ('{"tracks": 5}', "expected a list of tracks"),
    ("[[[1, 2], [NaN, 3]]]", "NaN or infinite"),
    ("[[[20, 2], [3, 3]]]", r"tracks\[0\] start: \(20, 2\) is outside the 10x10 image"),
    ('{"tracks": [], "anchors": [[11, 0]]}', "anchors: .* is outside"),
    ("{{", "tracks: not valid JSON"),
])
def test_tracks_errors_name_the_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_tracks(text, size=(10, 10))


def test_load_json_passes_parsed_values():
    assert load_json([1], "x") == [1] and load_json({"a": 1}, "x") == {"a": 1}
    assert load_json("  ", "x") == []
