// The native protocol of docs/protocol.md, version 1: a 24-byte big-endian header, then the payload.
// Sans-IO like voicegrow/protocol/native.py: bytes in, frames out; frames in, bytes out.

export const TYPE = { HELLO: 0x01, HELLO_ACK: 0x02, AUDIO: 0x10, CONTROL: 0x11, PING: 0x20, PONG: 0x21,
  ERROR: 0x30, CLOSE: 0x31 };
export const LAST_AUDIO = 1;
const HEADER = 24;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export class ProtocolError extends Error {}

const now = () => Math.floor(performance.now()) >>> 0;

export function encodeFrame(type, payload = new Uint8Array(0), { flags = 0, turnId = 0, seq = 0 } = {}) {
  const bytes = new Uint8Array(HEADER + payload.byteLength);
  const view = new DataView(bytes.buffer);
  bytes[0] = 0x56; bytes[1] = 0x47; bytes[2] = 1; bytes[3] = type;
  view.setUint32(4, flags >>> 0);
  view.setUint32(8, turnId >>> 0);
  view.setUint32(12, seq >>> 0);
  view.setUint32(16, now());
  view.setUint32(20, payload.byteLength);
  bytes.set(payload instanceof Uint8Array ? payload : new Uint8Array(payload), HEADER);
  return bytes.buffer;
}

export function encodeJson(type, object, opts) {
  return encodeFrame(type, encoder.encode(JSON.stringify(object)), opts);
}

export function encodeControl(event, data = {}, opts) {
  return encodeJson(TYPE.CONTROL, { event, data }, opts);
}

/** A whole frame from one binary WebSocket message. */
export function decodeFrame(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.byteLength < HEADER) throw new ProtocolError("frame shorter than its header");
  const view = new DataView(buffer);
  if (bytes[0] !== 0x56 || bytes[1] !== 0x47 || bytes[2] !== 1) throw new ProtocolError("not a version 1 frame");
  const length = view.getUint32(20);
  if (length !== bytes.byteLength - HEADER) throw new ProtocolError("payload length does not match the message");
  const frame = { type: bytes[3], flags: view.getUint32(4), turnId: view.getUint32(8), seq: view.getUint32(12),
    timestamp: view.getUint32(16), payload: bytes.subarray(HEADER) };
  if (frame.type === TYPE.HELLO_ACK) frame.json = JSON.parse(decoder.decode(frame.payload));
  else if (frame.type === TYPE.CONTROL) {
    const message = JSON.parse(decoder.decode(frame.payload));
    frame.event = message.event;
    frame.data = message.data || {};
  } else if (frame.type === TYPE.ERROR || frame.type === TYPE.CLOSE) {
    frame.code = frame.payload.byteLength >= 2 ? new DataView(buffer, HEADER).getUint16(0) : 0;
    frame.reason = decoder.decode(frame.payload.subarray(2));
  }
  return frame;
}

/** A u64 nonce payload (PING/PONG) copied as is. */
export function pong(frame) {
  return encodeFrame(TYPE.PONG, frame.payload.slice());
}
