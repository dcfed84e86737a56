// The operator console: live sessions, health, per-stage latency, devices and their conversations.
// Everything comes from the JSON API with the admin token; nothing is shown before sign-in.

import { api, audioUrl, AuthError, checkSignIn, getToken, setToken, setupSignIn } from "./api.js";
import { setupLanguageSwitch, t } from "./i18n.js";
import { el, formatTime, clear } from "./dom.js";
import { drawLatencyChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const state = { device: null, q: "", cursor: null, turns: [], timers: [], rendered: new Map() };

function show(signedIn) {
  $("signin").hidden = signedIn;
  $("console").hidden = !signedIn;
  $("signout").hidden = !signedIn || !getToken(); // nothing to sign out of when no token was asked
}

function stopPolling() {
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
}

function signedOut() {
  stopPolling();
  state.turns = [];
  forgetTurns();
  clear($("sessions").tBodies[0]);
  clear($("devices").tBodies[0]);
  clear($("health"));
  clear($("latency"));
  show(false);
}

async function guarded(job) {
  try {
    await job();
  } catch (exc) {
    if (exc instanceof AuthError) {
      setToken("");
      signedOut();
      return;
    }
    $("notice").textContent = t("error.load", { reason: exc.message });
  }
}

async function refreshSessions() {
  const { sessions } = await api("/api/v1/sessions");
  const body = $("sessions").tBodies[0];
  clear(body);
  for (const s of sessions) {
    body.append(el("tr", { dataset: { sessionId: s.session_id } },
      el("td", {}, s.device_id || "—"), el("td", {}, s.protocol),
      el("td", { className: `state state-${s.state}` }, t(`state.${s.state}`)),
      el("td", {}, formatTime(s.since)), el("td", {}, String(s.turns)), el("td", {}, s.remote_addr)));
  }
  $("sessions-empty").hidden = sessions.length > 0;
}

async function refreshHealth() {
  const health = await api("/api/v1/health/detail");
  $("health-overall").textContent = `${health.status} · ${health.version} · ${t("sessions.title")}: ${health.sessions}`;
  $("health-overall").className = `status-${health.status}`;
  const list = $("health");
  clear(list);
  for (const [name, c] of Object.entries(health.components)) {
    const facts = [];
    if (c.backend) facts.push(c.backend);
    if (c.engine) facts.push(c.engine);
    if (c.model) facts.push(c.model);
    if (c.spool_depth !== undefined) facts.push(`${t("health.spool")} ${c.spool_depth}`);
    if (c.latency_ms !== undefined) facts.push(`${c.latency_ms} ms`);
    list.append(el("li", { dataset: { component: name } },
      el("span", { className: `badge status-${c.status}` }, c.status),
      el("strong", {}, name), el("span", { className: "muted" }, facts.join(" · ")),
      c.detail ? el("span", { className: "detail" }, String(c.detail)) : ""));
  }
}

async function refreshDevices() {
  const { devices } = await api("/api/v1/devices?limit=200");
  const body = $("devices").tBodies[0];
  clear(body);
  for (const d of devices) {
    const show = el("button", { type: "button" }, t("devices.show"));
    show.addEventListener("click", () => selectDevice(d.device_id));
    const remove = el("button", { type: "button", className: "danger" }, t("devices.delete"));
    remove.addEventListener("click", () => deleteDevice(d.device_id));
    body.append(el("tr", { dataset: { deviceId: d.device_id } },
      el("td", {}, d.device_id), el("td", {}, formatTime(d.last_seen_at)),
      el("td", {}, d.live ? "●" : ""), el("td", { className: "actions" }, show, remove)));
  }
  $("devices-empty").hidden = devices.length > 0;
}

function turnsQuery(cursor) {
  const params = new URLSearchParams({ limit: "50" });
  if (state.device) params.set("device_id", state.device);
  if (state.q) params.set("q", state.q);
  if (cursor) params.set("cursor", cursor);
  return `/api/v1/conversations?${params}`;
}

async function refreshTurns() {
  const page = await api(turnsQuery(null));
  // Keep the pages already loaded below the first one; only the newest page is re-read.
  const known = new Set(page.turns.map((turn) => turn.turn_id));
  const older = state.turns.slice(50).filter((turn) => !known.has(turn.turn_id));
  state.turns = [...page.turns, ...older];
  if (older.length === 0) state.cursor = page.next_cursor; // else "More" goes on after the last page read
  renderTurns();
  drawLatencyChart($("latency"), page.turns.slice(0, 20).reverse(), t);
  $("latency-empty").hidden = page.turns.some((turn) => turn.timings_ms && turn.timings_ms.speech_end !== undefined);
}

async function loadMore() {
  if (!state.cursor) return;
  const page = await api(turnsQuery(state.cursor));
  state.turns.push(...page.turns);
  state.cursor = page.next_cursor;
  renderTurns();
}

function audioControl(label, url) {
  const wrap = el("div", { className: "audio" });
  if (!url) return wrap;
  const audio = el("audio", { controls: true, preload: "none" });
  audio.hidden = true;
  const button = el("button", { type: "button", className: "play" }, `${t("turns.play")} · ${label}`);
  button.addEventListener("click", () => guarded(async () => {
    if (!audio.src) audio.src = await audioUrl(url);
    audio.hidden = false;
    await audio.play();
  }));
  wrap.append(button, audio);
  return wrap;
}

function turnNode(turn) {
  const timings = turn.timings_ms || {};
  const end = timings.speech_end ?? 0;
  const stages = ["asr_done", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio_sent"]
    .filter((stage) => typeof timings[stage] === "number")
    .map((stage) => `${t(`stage.${stage}`)} +${Math.round(timings[stage] - end)}`);
  return el("li", { className: `turn outcome-${turn.outcome}`, dataset: { turnId: turn.turn_id } },
    el("div", { className: "turn-head" },
      el("time", {}, formatTime(turn.started_at)), el("span", { className: "device" }, turn.device_id),
      el("span", { className: "badge" }, turn.outcome), el("span", { className: "muted" }, turn.language || "")),
    el("p", { className: "heard" }, el("b", {}, `${t("turns.heard")}: `), turn.transcript || "—"),
    el("p", { className: "replied" }, el("b", {}, `${t("turns.replied")}: `), turn.reply_text || "—"),
    el("p", { className: "timings muted" }, stages.join(" · ")),
    el("div", { className: "audios" }, audioControl(t("turns.in"), turn.audio_in_url),
      audioControl(t("turns.out"), turn.audio_out_url)));
}

function renderTurns() {
  const list = $("turns");
  const wanted = state.turns.map((turn) => turn.turn_id);
  const current = [...list.children].map((node) => node.dataset.turnId);
  if (wanted.join("\n") !== current.join("\n")) {
    // Rebuild the order, reusing nodes so that audio being played is not interrupted.
    const nodes = state.turns.map((turn) => state.rendered.get(turn.turn_id) || turnNode(turn));
    state.rendered = new Map(nodes.map((node) => [node.dataset.turnId, node]));
    list.replaceChildren(...nodes);
  }
  $("turns-empty").hidden = state.turns.length > 0;
  $("more").hidden = !state.cursor;
  $("turns-device").textContent = state.device ? `· ${state.device}` : "";
}

function forgetTurns() {
  for (const audio of $("turns").querySelectorAll("audio")) {
    if (audio.src.startsWith("blob:")) URL.revokeObjectURL(audio.src); // the downloaded recording
  }
  state.rendered.clear();
  clear($("turns"));
}

function resetTurns() {
  state.turns = [];
  state.cursor = null;
  forgetTurns();
  return guarded(refreshTurns);
}

function selectDevice(deviceId) {
  state.device = deviceId;
  resetTurns();
}

async function deleteDevice(deviceId) {
  if (!confirm(t("devices.confirm", { device: deviceId }))) return;
  await guarded(async () => {
    await api(`/api/v1/devices/${encodeURIComponent(deviceId)}/data`, { method: "DELETE" });
    $("notice").textContent = t("devices.deleted", { device: deviceId });
    if (state.device === deviceId) state.device = null;
    await refreshDevices();
    await resetTurns();
  });
}

function startPolling() {
  stopPolling();
  const every = (ms, job) => {
    guarded(job);
    state.timers.push(setInterval(() => guarded(job), ms));
  };
  every(1000, refreshSessions);
  every(5000, refreshHealth);
  every(5000, refreshDevices);
  every(3000, refreshTurns);
}

function signedIn() {
  show(true);
  startPolling();
}

function rerender() {
  forgetTurns();
  if (!$("console").hidden) startPolling();
}

async function main() {
  setupLanguageSwitch($("lang"), rerender);
  setupSignIn($("signin-form"), {
    onSignedIn: () => { $("signin-error").hidden = true; signedIn(); },
    onRefused: () => { $("signin-error").textContent = t("auth.wrong"); $("signin-error").hidden = false; },
  });
  $("signout").addEventListener("click", () => { setToken(""); signedOut(); });
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    state.q = $("q").value.trim();
    resetTurns();
  });
  $("all-devices").addEventListener("click", () => selectDevice(null));
  $("more").addEventListener("click", () => guarded(loadMore));
  const { signedIn: ok } = await checkSignIn();
  if (ok) signedIn();
  else show(false);
}

main().catch((exc) => { document.body.dataset.error = String(exc); });
