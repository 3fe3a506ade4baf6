"""The voice agent's pure logic: dialogue, voice activity segmentation, events between voice nodes."""
