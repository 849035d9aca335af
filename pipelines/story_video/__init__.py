"""StoryDiffusion story-to-video: the semantic motion predictor (``predictor``), transitions
decoded by DynamiCrafter-interp (``transitions``) and the predictor's trainer (``train``)."""
