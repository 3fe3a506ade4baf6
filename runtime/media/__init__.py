"""Audio, pictures and text as the contract carries them: WAV, resampling, PNG, sentences."""
