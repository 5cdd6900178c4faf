"""ComfyUI nodes of the pack, one file per node family (V3 schema, `comfy_api.latest`).

The families import ComfyUI at module level, so they are imported only inside `comfy_entrypoint`:
importing this package outside ComfyUI (the core test tier) never touches ComfyUI.
"""


def node_classes():
    from .edit_video import EditVideoNode
    from .invert import InvertNode
    from .lora_files import LoadMotionLoraNode, SaveMotionLoraNode
    from .matched_sampler import EditConditioningNode, MatchedSamplerNode
    from .metrics import MetricsNode
    from .propagate import PropagateNode
    from .samplers import InversionSamplerNode
    from .source import SourceClipsNode
    from .train import TrainMotionLoraNode

    return [SourceClipsNode, InvertNode, TrainMotionLoraNode, SaveMotionLoraNode, LoadMotionLoraNode, PropagateNode,
            EditVideoNode, InversionSamplerNode, EditConditioningNode, MatchedSamplerNode, MetricsNode]


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class I2VEditExtension(ComfyExtension):
        async def get_node_list(self):
            return node_classes()

    return I2VEditExtension()
