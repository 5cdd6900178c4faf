// I2VEdit front-end: the temporal preset fills beta1/beta2, and editing them switches the preset to "custom".
// Served by ComfyUI from WEB_DIRECTORY ("./js") as /extensions/<pack>/i2vedit.js. Status text under the nodes
// comes from the nodes themselves (ComfyUI's progress text); this file does only what needs the page.
import { app } from "../../scripts/app.js";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// The preset table travels in the node definition (nodes/propagate.py puts i2vedit_core's PRESETS on the
// preset input), so the page never keeps its own copy.
function presetTable(nodeData) {
  const spec = nodeData?.input?.required?.preset;
  return spec?.[1]?.presets ?? null;
}

function linkPreset(node, presets) {
  const preset = widget(node, "preset"), beta1 = widget(node, "beta1"), beta2 = widget(node, "beta2");
  if (!preset || !beta1 || !beta2) return;
  let updating = false;
  const fill = () => {
    const values = presets[preset.value];
    if (!values) return;
    updating = true;
    [beta1.value, beta2.value] = values;
    updating = false;
    node.setDirtyCanvas(true, true);
  };
  const presetCallback = preset.callback;
  preset.callback = function (...args) {
    const result = presetCallback?.apply(this, args);
    fill();
    return result;
  };
  for (const beta of [beta1, beta2]) {
    const betaCallback = beta.callback;
    beta.callback = function (...args) {
      const result = betaCallback?.apply(this, args);
      const values = presets[preset.value];
      if (!updating && values && (beta1.value !== values[0] || beta2.value !== values[1])) preset.value = "custom";
      return result;
    };
  }
}

app.registerExtension({
  name: "i2vedit.ui",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const presets = presetTable(nodeData);
    if (!presets) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = created?.apply(this, args);
      linkPreset(this, presets);
      return result;
    };
  },
});
