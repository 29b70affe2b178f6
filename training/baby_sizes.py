"""The baby's VAE widths, without torch: train.py checks --vae-downsampling against them before it
imports torch, and training/baby.py builds the baby's VAE from them."""

# By how much the VAE downsamples: 4 is the three levels of the shipped baby (32x32 frames), 8 four
# levels in SDXL's proportions (its 128, 256, 512, 512 over 16).
BABY_VAE_CHANNELS = {4: (16, 32, 32), 8: (8, 16, 32, 32)}
