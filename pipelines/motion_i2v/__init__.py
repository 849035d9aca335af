"""Motion-I2V: motion-field prediction (stage 1) and motion-augmented video rendering (stage 2)."""
