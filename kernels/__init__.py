"""Pure-torch kernels: no ComfyUI, no diffusers. Shapes are in each function's docstring."""
