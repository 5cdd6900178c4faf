"""ComfyUI nodes of the pack, one file per node family (V3 schema).

The node families land with the node-pack issue; until then the extension registers no node,
so installing the pack never breaks ComfyUI's start-up.
"""


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class I2VEditExtension(ComfyExtension):
        async def get_node_list(self):
            return []

    return I2VEditExtension()
