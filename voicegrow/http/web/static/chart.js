// Per-stage latency of the last turns as an SVG line chart: for each turn (oldest left), the
// milliseconds from the end of speech to each stage, as the server measured them (timings_ms).

const SVG = "http://www.w3.org/2000/svg";
export const STAGES = ["asr_done", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio_sent"];
const W = 640, H = 240, PAD = { left: 48, right: 12, top: 12, bottom: 28 };

function node(tag, attrs = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

function sinceEnd(turn, stage) {
  const timings = turn.timings_ms || {};
  if (typeof timings[stage] !== "number" || typeof timings.speech_end !== "number") return null;
  return Math.max(0, timings[stage] - timings.speech_end);
}

export function drawLatencyChart(container, turns, t) {
  const timed = turns.filter((turn) => STAGES.some((stage) => sinceEnd(turn, stage) !== null));
  container.replaceChildren();
  if (timed.length === 0) return;
  const max = Math.max(100, ...timed.flatMap((turn) => STAGES.map((s) => sinceEnd(turn, s) ?? 0)));
  const top = Math.ceil(max / 500) * 500;
  const x = (i) => PAD.left + (timed.length === 1 ? (W - PAD.left - PAD.right) / 2
    : (i * (W - PAD.left - PAD.right)) / (timed.length - 1));
  const y = (ms) => H - PAD.bottom - (ms / top) * (H - PAD.top - PAD.bottom);
  const svg = node("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": t("latency.title") });
  for (let ms = 0; ms <= top; ms += top / 4) {
    svg.append(node("line", { x1: PAD.left, x2: W - PAD.right, y1: y(ms), y2: y(ms), class: "grid" }));
    svg.append(node("text", { x: PAD.left - 6, y: y(ms) + 4, class: "axis", "text-anchor": "end" }, String(ms)));
  }
  timed.forEach((turn, i) => svg.append(node("text", { x: x(i), y: H - 8, class: "axis", "text-anchor": "middle" },
    String(i + 1))));
  for (const stage of STAGES) {
    const points = timed.map((turn, i) => [x(i), sinceEnd(turn, stage)]).filter(([, v]) => v !== null);
    if (points.length === 0) continue;
    const line = node("polyline", { points: points.map(([px, v]) => `${px},${y(v)}`).join(" "),
      class: `series stage-${stage}` });
    line.append(node("title", {}, t(`stage.${stage}`)));
    svg.append(line);
    for (const [px, v] of points) {
      const dot = node("circle", { cx: px, cy: y(v), r: 3, class: `dot stage-${stage}` });
      dot.append(node("title", {}, `${t(`stage.${stage}`)}: ${Math.round(v)} ms`));
      svg.append(dot);
    }
  }
  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const stage of STAGES) {
    const item = document.createElement("li");
    item.className = `stage-${stage}`;
    item.textContent = t(`stage.${stage}`);
    legend.append(item);
  }
  container.append(svg, legend);
}
