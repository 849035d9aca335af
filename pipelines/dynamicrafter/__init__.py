"""DynamiCrafter: image animation by dual-stream image injection into a video diffusion UNet."""
