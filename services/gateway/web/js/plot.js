// Two small SVG charts, drawn by hand: a line plot (the loss curves) and a timeline (who held the GPU). Both are a
// few dozen lines; a charting library would be larger than the whole page.
const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 220, PAD = { left: 48, right: 12, top: 12, bottom: 28 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function frame(height) {
  return svg("svg", { viewBox: `0 0 ${W} ${height}`, width: "100%", preserveAspectRatio: "xMidYMid meet" });
}

// series: [{label, className, points: [[x, y], ...]}]. Axes span every point; a series of one point is a dot.
export function linePlot(container, series) {
  const all = series.flatMap((s) => s.points);
  const root = frame(H);
  if (all.length) {
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
    const pad = (Math.max(...ys) - Math.min(...ys)) * 0.05 || 0.5;
    const [y0, y1] = [Math.min(...ys) - pad, Math.max(...ys) + pad];
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
    const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
    axes(root, [x0, x1].map((x) => [sx(x), String(Math.round(x))]), [y0, y1].map((y) => [sy(y), y.toFixed(2)]), H);
    for (const s of series) {
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      root.append(svg("path", { d, class: `line ${s.className}` }));
      for (const [x, y] of s.points) root.append(svg("circle", { cx: sx(x), cy: sy(y), r: 2.5, class: `dot ${s.className}` }));
    }
  }
  legend(root, series);
  container.replaceChildren(root);
}

function axes(root, xTicks, yTicks, height) {
  root.append(svg("line", { x1: PAD.left, y1: height - PAD.bottom, x2: W - PAD.right, y2: height - PAD.bottom, class: "axis" }));
  root.append(svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: height - PAD.bottom, class: "axis" }));
  for (const [x, label] of xTicks) root.append(svg("text", { x, y: height - 8, "text-anchor": "middle", class: "tick" }, label));
  for (const [y, label] of yTicks) root.append(svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, label));
}

function legend(root, series) {
  series.forEach((s, i) => {
    const x = W - PAD.right - 130, y = PAD.top + 12 + i * 16;
    root.append(svg("line", { x1: x, y1: y - 4, x2: x + 18, y2: y - 4, class: `line ${s.className}` }));
    root.append(svg("text", { x: x + 24, y, class: "tick" }, `${s.label} (${s.points.length})`));
  });
}

// rows: kinds in order; intervals: [{kind, label, start, end}] in seconds before now (end 0 = still held).
export function timeline(container, rows, intervals, windowS, labels) {
  const height = PAD.top + PAD.bottom + rows.length * 28;
  const root = frame(height);
  const sx = (ago) => PAD.left + 70 + (1 - ago / windowS) * (W - PAD.left - 70 - PAD.right);
  const ticks = [60, 45, 30, 15, 0].map((m) => [sx(m * 60), m ? labels.ago(m) : labels.now]);
  for (const [x, label] of ticks) root.append(svg("text", { x, y: height - 8, "text-anchor": "middle", class: "tick" }, label));
  rows.forEach((kind, i) => {
    const y = PAD.top + i * 28;
    root.append(svg("text", { x: PAD.left + 62, y: y + 17, "text-anchor": "end", class: "tick" }, kind));
    root.append(svg("line", { x1: sx(windowS), y1: y + 22, x2: sx(0), y2: y + 22, class: "axis" }));
    for (const iv of intervals.filter((v) => v.kind === kind)) {
      const x = sx(Math.min(iv.start, windowS)), width = Math.max(2, sx(iv.end) - x);
      const bar = svg("rect", { x, y: y + 4, width, height: 18, rx: 3, class: `bar ${kind}${iv.end ? "" : " held"}` });
      bar.append(svg("title", {}, iv.label));
      root.append(bar);
    }
  });
  container.replaceChildren(root);
}
