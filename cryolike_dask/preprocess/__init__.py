"""Maps and models → templates; particle images → polar Fourier images (NUFFT, finufft)."""
