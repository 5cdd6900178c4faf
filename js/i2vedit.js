// I2VEdit front-end: a live status badge on I2VEdit nodes, and the temporal preset filling beta1/beta2.
// Served by ComfyUI from WEB_DIRECTORY ("./js") as /extensions/<pack>/i2vedit.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "i2vedit.progress"; // sent by nodes/host.py (NodeProgress)
// Same numbers as i2vedit_core/attention/temporal.py PRESETS.
const PRESETS = { local: [0.5, 0.8], style: [0.8, 0.9], shape: [0.4, 0.5] };

function formatEta(seconds) {
  if (seconds == null || !isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  return ` · ETA ${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function statusText(d) {
  const clip = d.clips > 1 ? ` clip ${d.clip + 1}/${d.clips}` : "";
  const steps = d.total > 1 ? ` ${d.step}/${d.total}` : "";
  const loss = d.loss != null ? ` · loss ${Number(d.loss).toFixed(4)}` : "";
  return `${d.stage}${clip}${steps}${loss}${formatEta(d.eta)}`;
}

function drawBadge(node, ctx) {
  if (!node.i2veditStatus || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "12px sans-serif";
  const width = ctx.measureText(node.i2veditStatus).width + 12;
  ctx.fillStyle = "#1d4e89";
  ctx.beginPath();
  ctx.roundRect?.(node.size[0] - width - 4, -LiteGraph.NODE_TITLE_HEIGHT - 22, width, 18, 6);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.fillText(node.i2veditStatus, node.size[0] - width + 2, -LiteGraph.NODE_TITLE_HEIGHT - 9);
  ctx.restore();
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// preset -> beta1/beta2; editing a beta away from the preset's values switches the preset to "custom".
function linkPreset(node) {
  const preset = widget(node, "preset"), beta1 = widget(node, "beta1"), beta2 = widget(node, "beta2");
  if (!preset || !beta1 || !beta2) return;
  let updating = false;
  const fill = () => {
    const values = PRESETS[preset.value];
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
      const values = PRESETS[preset.value];
      if (!updating && values && (beta1.value !== values[0] || beta2.value !== values[1])) preset.value = "custom";
      return result;
    };
  }
}

app.registerExtension({
  name: "i2vedit.ui",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (!node) return;
      node.i2veditStatus = statusText(detail);
      node.setDirtyCanvas(true, true);
    });
    // A new run starts without the previous run's badges.
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?._nodes ?? []) delete node.i2veditStatus;
    });
  },
  nodeCreated(node) {
    if (!node.comfyClass?.startsWith("I2VEdit")) return;
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (ctx, ...rest) {
      const result = draw?.apply(this, [ctx, ...rest]);
      drawBadge(this, ctx);
      return result;
    };
    linkPreset(node);
  },
});
