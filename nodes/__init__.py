"""ComfyUI nodes of ComfyUI-Janus (thin glue over janus_core)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
