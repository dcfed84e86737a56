// The talk page: the microphone through an AudioWorklet as 16 kHz PCM, the native protocol over the
// HTTP port's /api/v1/talk WebSocket, the reply played gaplessly, barge-in by talking or by Stop.

import { checkSignIn, getToken, setToken, setupSignIn } from "./api.js";
import { setupLanguageSwitch, t } from "./i18n.js";
import { el } from "./dom.js";
import { decodeFrame, encodeControl, encodeFrame, encodeJson, pong, TYPE } from "./native.js";
import { Player } from "./player.js";

const $ = (id) => document.getElementById(id);
const INPUT_RATE = 16000;
const OUTPUT_RATE = 24000;
const SUBPROTOCOL = "voicegrow.native.v1";
const DEVICE_KEY = "voicegrow.talk.device_id";
const TIMED = ["asr_done", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio_sent"];

const page = { config: null, signedIn: false };
let call = null; // the conversation in progress

function setStatus(key, params) {
  $("status").textContent = t(key, params);
  $("status").dataset.state = key;
}

function deviceId() {
  const value = $("device-id").value.trim();
  return /^[A-Za-z0-9._:-]{1,128}$/.test(value) ? value : null;
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function hmacHex(secret, message) {
  const enc = new TextEncoder();
  const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false,
    ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, enc.encode(message)));
  return [...mac].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** The log entries of one turn: what was heard, the reply as it streams, and the stage timings. */
class TurnView {
  constructor(turnId) {
    this.turnId = turnId;
    this.user = el("p", { className: "entry user", dataset: { turnId } },
      el("b", {}, `${t("talk.you")}: `), el("span", { className: "text" }));
    this.reply = el("p", { className: "entry assistant", dataset: { turnId } },
      el("b", {}, `${t("talk.assistant")}: `), el("span", { className: "text" }));
    this.timings = el("p", { className: "entry timings muted", dataset: { turnId } });
    this.node = el("div", { className: "turn", dataset: { turnId } }, this.user, this.reply, this.timings);
    $("log").append(this.node);
  }

  heard(text) { this.user.querySelector(".text").textContent = text; this.scroll(); }
  addReply(text) { this.reply.querySelector(".text").textContent += text; this.scroll(); }
  setReply(text) { this.reply.querySelector(".text").textContent = text; this.scroll(); }
  interrupted() {
    if (this.reply.classList.contains("interrupted")) return;
    this.reply.classList.add("interrupted");
    this.reply.append(` ${t("talk.interrupted")}`);
  }

  showTimings(timings) {
    const end = timings.speech_end ?? 0;
    const parts = TIMED.filter((stage) => typeof timings[stage] === "number")
      .map((stage) => `${t(`stage.${stage}`)} +${Math.round(timings[stage] - end)} ms`);
    this.timings.textContent = `${t("talk.timings")}: ${parts.join(" · ")}`;
    this.timings.dataset.timings = JSON.stringify(timings);
  }

  scroll() { $("log").scrollTop = $("log").scrollHeight; }
}

class Call {
  constructor() {
    this.player = new Player();
    this.ws = null;
    this.mic = null;
    this.micCtx = null;
    this.seq = 0;
    this.turns = new Map();
    this.playingTurn = 0;
    this.aborted = new Set();
    this.error = null;
    this.closedByUs = false;
    this.player.onIdle = () => this.updateStop();
  }

  turn(turnId) {
    if (!this.turns.has(turnId)) this.turns.set(turnId, new TurnView(turnId));
    return this.turns.get(turnId);
  }

  async start() {
    await this.player.start(); // inside the click: the browser lets audio start
    setStatus("talk.status.connecting");
    const protocols = [SUBPROTOCOL];
    if (getToken()) protocols.push(`voicegrow.bearer.${base64url(getToken())}`);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(`${scheme}//${location.host}/api/v1/talk`, protocols);
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => this.hello();
    this.ws.onmessage = (event) => this.receive(event.data).catch((exc) => this.fail(exc));
    this.ws.onclose = (event) => this.closed(event);
  }

  send(bytes) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes);
  }

  hello() {
    const hello = { device_id: deviceId(), client: "voicegrow-talk-page/1",
      audio_in: { sample_rate: INPUT_RATE, channels: 1, sample_width: 2, codec: "pcm_s16le" },
      audio_out: { sample_rate: OUTPUT_RATE, channels: 1, sample_width: 2, codec: "pcm_s16le" } };
    if (!page.signedIn && page.config.device_auth === "token") hello.token = $("device-secret").value;
    this.send(encodeJson(TYPE.HELLO, hello));
  }

  async receive(data) {
    if (typeof data === "string") return;
    const frame = decodeFrame(data);
    switch (frame.type) {
      case TYPE.HELLO_ACK:
        this.session = frame.json.session_id;
        this.outputRate = frame.json.audio_out.sample_rate;
        this.player.setRate(this.outputRate);
        if (frame.json.nonce) {
          const proof = await hmacHex($("device-secret").value, `${frame.json.nonce}\n${deviceId()}\n${this.session}`);
          this.send(encodeControl("auth", { hmac: proof }));
        } else await this.startMic();
        break;
      case TYPE.CONTROL:
        await this.control(frame);
        break;
      case TYPE.AUDIO:
        if (!this.aborted.has(frame.turnId)) {
          this.player.push(frame.payload);
          this.playingTurn = frame.turnId;
          this.updateStop();
        }
        break;
      case TYPE.PING:
        this.send(pong(frame));
        break;
      case TYPE.ERROR:
        this.error = frame.reason;
        break;
      case TYPE.CLOSE:
        this.send(encodeFrame(TYPE.CLOSE, new Uint8Array([0x03, 0xe8])));
        break;
      default:
        break;
    }
  }

  async control(frame) {
    const { event, data, turnId } = frame;
    if (event === "auth_ok") await this.startMic();
    else if (event === "asr_final") {
      // A new utterance: whatever still plays of an older reply is over (the server aborts it too).
      if (this.playingTurn && this.playingTurn !== turnId) this.stopPlayback(this.playingTurn);
      this.turn(turnId).heard(data.text);
    } else if (event === "llm_text") this.turn(turnId).addReply(data.text);
    else if (event === "error_spoken" && data.text) this.turn(turnId).setReply(data.text);
    else if (event === "tts_start") this.player.setRate(data.sample_rate || this.outputRate);
    else if (event === "tts_stop" && data.reason === "aborted") {
      this.stopPlayback(turnId);
      this.turn(turnId).interrupted();
      this.turn(turnId).node.dataset.stopped = data.cause || "aborted"; // barge_in, device_abort, …
    } else if (event === "turn_end" && data.outcome === "interrupted") this.turn(turnId).interrupted();
    else if (event === "turn_timings") this.turn(turnId).showTimings(data);
  }

  stopPlayback(turnId) {
    this.aborted.add(turnId);
    this.player.stop();
    this.updateStop();
  }

  /** The Stop button: the server stops the turn, the page drops what it queued. */
  abortReply() {
    const turnId = this.playingTurn;
    this.send(encodeControl("abort", { reason: "stop_button" }, { turnId }));
    this.stopPlayback(turnId);
  }

  updateStop() {
    $("stop").disabled = !this.player.playing;
    const ms = Math.round((this.player.playedSamples / (this.outputRate || OUTPUT_RATE)) * 1000);
    $("meter").dataset.playedMs = String(ms);
    $("meter").textContent = ms ? t("talk.played", { seconds: (ms / 1000).toFixed(1) }) : "";
  }

  async startMic() {
    try {
      this.mic = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    } catch (exc) {
      setStatus("talk.status.nomic", { reason: exc.message || exc.name });
      this.hangUp();
      return;
    }
    // The device's own rate: the worklet resamples to 16 kHz (not every browser lets a microphone feed
    // a context at another rate).
    this.micCtx = new AudioContext();
    await this.micCtx.audioWorklet.addModule("/static/capture-worklet.js");
    const source = this.micCtx.createMediaStreamSource(this.mic);
    const capture = new AudioWorkletNode(this.micCtx, "voicegrow-capture",
      { channelCount: 1, processorOptions: { targetRate: INPUT_RATE } });
    const mute = this.micCtx.createGain();
    mute.gain.value = 0;
    capture.port.onmessage = (event) => {
      this.send(encodeFrame(TYPE.AUDIO, new Uint8Array(event.data), { seq: this.seq++ }));
      if (this.player.playing) this.updateStop();
    };
    source.connect(capture).connect(mute).connect(this.micCtx.destination);
    setStatus("talk.status.listening");
    document.body.dataset.talking = "true";
  }

  hangUp() {
    this.closedByUs = true;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.send(encodeFrame(TYPE.CLOSE, new Uint8Array([0x03, 0xe8])));
      this.ws.close(1000);
    }
    this.release();
  }

  release() {
    if (this.mic) for (const track of this.mic.getTracks()) track.stop();
    if (this.micCtx) this.micCtx.close();
    this.mic = this.micCtx = null;
    this.player.stop();
    document.body.dataset.talking = "false";
  }

  closed(event) {
    this.release();
    if (this.error || (event.code >= 4000 && !this.closedByUs)) {
      setStatus("talk.status.refused", { reason: this.error || `${event.code} ${event.reason}` });
    } else if (!this.closedByUs && !event.wasClean) {
      setStatus("talk.status.refused", { reason: `WebSocket ${event.code}` });
    } else setStatus("talk.status.closed");
    if (call === this) endCall();
  }

  fail(exc) {
    this.error = exc.message;
    this.hangUp();
    setStatus("talk.status.refused", { reason: exc.message });
  }
}

function endCall() {
  call = null;
  $("talk").setAttribute("aria-pressed", "false");
  $("stop").disabled = true;
}

async function toggleTalk() {
  if (call) {
    const ending = call;
    endCall();
    ending.hangUp();
    setStatus("talk.status.closed");
    return;
  }
  if (!deviceId()) {
    $("device-id").focus();
    return;
  }
  localStorage.setItem(DEVICE_KEY, deviceId());
  call = new Call();
  $("talk").setAttribute("aria-pressed", "true");
  try {
    await call.start();
  } catch (exc) {
    call.fail(exc);
  }
}

function updateAccess() {
  const deviceAuth = page.config.device_auth !== "off";
  $("signin").hidden = page.signedIn;
  $("signout").hidden = !page.signedIn || !getToken();
  $("secret-field").hidden = page.signedIn || !deviceAuth;
  // Without the operator's token only a device credential opens a session (DEVICE_AUTH on).
  $("talk").disabled = !(page.signedIn || deviceAuth);
}

async function main() {
  setupLanguageSwitch($("lang"));
  $("device-id").value = localStorage.getItem(DEVICE_KEY) ||
    `browser-${crypto.getRandomValues(new Uint32Array(1))[0].toString(16).padStart(8, "0")}`;
  const { config, signedIn } = await checkSignIn();
  page.config = config;
  page.signedIn = signedIn;
  setupSignIn($("signin-form"), {
    onSignedIn: () => { page.signedIn = true; $("signin-error").hidden = true; updateAccess(); },
    onRefused: () => { $("signin-error").textContent = t("auth.wrong"); $("signin-error").hidden = false; },
  });
  $("signout").addEventListener("click", () => { setToken(""); page.signedIn = false; updateAccess(); });
  $("talk").addEventListener("click", () => toggleTalk());
  $("device-form").addEventListener("submit", (event) => event.preventDefault());
  $("stop").addEventListener("click", () => call && call.abortReply());
  updateAccess();
}

main().catch((exc) => { setStatus("talk.status.refused", { reason: exc.message }); });
