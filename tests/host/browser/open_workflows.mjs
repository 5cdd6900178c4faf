// Browser tier: open every shipped workflow in the real ComfyUI front-end with headless Chromium.
// node open_workflows.mjs <comfy url> <screenshot dir> <run.json> <workflow.json>...
// run.json, the simulated run: {"stage_inputs": [[from, to], ...] (files to copy into ComfyUI's input folder),
//   "outputs": {node type: ui output as ComfyUI sends it}, "texts": {node type: progress text}}.
// Prints one JSON line per workflow: missing node types, the extension, the preset link (usePreset), the node/group boxes (graph
// coordinates, title bar included) as the workflow opens and after a simulated run (loader previews,
// outputs and progress text shown), for the Python side to check.
import { chromium } from "playwright-core";
import { copyFileSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";

const [url, shots, runFile, ...files] = process.argv.slice(2);
const run = JSON.parse(readFileSync(runFile, "utf8"));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-features=Translate,MediaRouter,OptimizationHints"],
});

// Node and group boxes [x, y, w, h] in graph coordinates, a node's title bar included.
function boxes() {
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = window.app.graph._nodes.map((n) => ({
    id: n.id, type: n.type, title: n.title, box: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title],
    widgets: (n.widgets ?? []).map((w) => w.name), images: n.imgs?.length ?? 0,
  }));
  const groups = window.app.graph._groups.map((g) => ({ title: g.title, box: [...g._bounding] }));
  return { nodes, groups };
}

// What the js extension does to a node with a preset: pick "style", then edit beta1 by hand.
function usePreset() {
  const node = window.app.graph._nodes.find((n) => n.widgets?.some((w) => w.name === "preset"));
  if (!node) return null;
  const widget = (name) => node.widgets.find((w) => w.name === name);
  const preset = widget("preset"), beta1 = widget("beta1"), beta2 = widget("beta2");
  preset.value = "style";
  preset.callback(preset.value);
  const style = [beta1.value, beta2.value];
  beta1.value = 0.33;
  beta1.callback(beta1.value);
  return { type: node.type, style, after_edit: preset.value };
}

async function settle(page, ms) {
  await page.waitForTimeout(ms);
  await page.evaluate(() => window.app.graph.setDirtyCanvas(true, true));
  await page.waitForTimeout(200);
}

try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url, { waitUntil: "networkidle" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 60000 });
  // A fresh profile opens the template browser on start; close it so screenshots show the graph.
  await page.waitForTimeout(1000);
  await page.keyboard.press("Escape");
  // Thumbnails show the graph only: no minimap, no render statistics, menus hidden (focus mode), all text drawn.
  await page.evaluate(async () => {
    const settings = window.app.extensionManager.setting;
    await settings.set("Comfy.Minimap.Visible", false);
    await settings.set("Comfy.Graph.CanvasInfo", false);
    await settings.set("Comfy.Graph.CanvasMenu", false);
    await settings.set("LiteGraph.Canvas.MinFontSizeForLOD", 0);  // text stays drawn however far zoomed out
  });
  const opened = [];
  for (const file of files) {
    const workflow = JSON.parse(readFileSync(file, "utf8"));
    const result = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const missing = wf.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
      const dialog = [...document.querySelectorAll(".p-dialog, .comfy-modal")]
        .some((d) => d.offsetParent !== null && /missing/i.test(d.textContent));
      const extension = window.app.extensions.some((e) => e.name === "i2vedit.ui");
      return { missing, dialog, extension };
    }, workflow);
    await page.keyboard.press("Escape");
    await settle(page, 500);
    await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
    await settle(page, 300);
    await page.screenshot({ path: join(shots, basename(file, ".json") + ".png") });
    await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
    opened.push({ name: basename(file), ...result, open: await page.evaluate(boxes), preset: await page.evaluate(usePreset) });
  }
  // The run: input files appear (loaders show previews), outputs and progress text arrive.
  for (const [from, to] of run.stage_inputs) copyFileSync(from, to);
  for (const [index, file] of files.entries()) {
    const workflow = JSON.parse(readFileSync(file, "utf8"));
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
    await settle(page, 1500);
    await page.evaluate(({ outputs, texts }) => {
      const api = window.comfyAPI.api.api;
      for (const node of window.app.graph._nodes) {
        const id = String(node.id);
        if (outputs[node.type]) api.dispatchCustomEvent("executed", { node: id, display_node: id, output: outputs[node.type] });
        if (node.type.startsWith("I2VEdit")) {
          const text = texts[node.type] ?? "propagate · clip 2/3 · step 25/25 · loss 0.0123 · ETA 3:12";
          api.dispatchCustomEvent("progress_text", { nodeId: id, text });
        }
      }
    }, run);
    await settle(page, 2500);
    console.log(JSON.stringify({ ...opened[index], ran: await page.evaluate(boxes) }));
  }
} finally {
  await browser.close();
}
