// Browser tier: open every shipped workflow in the real ComfyUI front-end with headless Chromium.
// node open_workflows.mjs <comfy url> <screenshot dir> <workflow.json>...
// Prints one JSON line per workflow: {name, missing: [node types the front-end does not know], extension}.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";

const [url, shots, ...files] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-features=Translate,MediaRouter,OptimizationHints"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url, { waitUntil: "networkidle" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 60000 });
  // A fresh profile opens the template browser on start; close it so screenshots show the graph.
  await page.waitForTimeout(1000);
  await page.keyboard.press("Escape");
  for (const file of files) {
    const workflow = JSON.parse(readFileSync(file, "utf8"));
    const result = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const missing = wf.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
      const dialog = [...document.querySelectorAll(".p-dialog, .comfy-modal")]
        .some((d) => d.offsetParent !== null && /missing/i.test(d.textContent));
      const extension = window.app.extensions.some((e) => e.name === "i2vedit.ui");
      return { missing, dialog, extension, nodes: window.app.graph._nodes.length };
    }, workflow);
    await page.waitForTimeout(300);
    await page.screenshot({ path: join(shots, basename(file, ".json") + ".png") });
    await page.keyboard.press("Escape");
    console.log(JSON.stringify({ name: basename(file), ...result }));
  }
} finally {
  await browser.close();
}
