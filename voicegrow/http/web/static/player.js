// Gapless playback of the reply: each AUDIO chunk becomes an AudioBuffer scheduled exactly where the
// previous one ends on the AudioContext's clock. stop() silences everything queued at once (barge-in).

export class Player {
  constructor() {
    this.ctx = null;
    this.rate = 24000;
    this.nextTime = 0;
    this.sources = new Set();
    this.playedSamples = 0; // samples whose playback actually ended (not merely scheduled)
    this.onIdle = () => {};
  }

  async start() {
    if (!this.ctx) this.ctx = new AudioContext();
    if (this.ctx.state !== "running") await this.ctx.resume();
  }

  setRate(rate) {
    this.rate = rate;
  }

  /** PCM s16le mono bytes (a Uint8Array view). */
  push(bytes) {
    if (!this.ctx || bytes.byteLength < 2) return;
    const samples = new Int16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + (bytes.byteLength & ~1)));
    const buffer = this.ctx.createBuffer(1, samples.length, this.rate);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) data[i] = samples[i] / 0x8000;
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    const at = Math.max(this.nextTime, this.ctx.currentTime + 0.05);
    source.start(at);
    this.nextTime = at + buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      if (!this.sources.delete(source)) return;
      this.playedSamples += samples.length;
      if (this.sources.size === 0) this.onIdle();
    };
  }

  get playing() {
    return this.sources.size > 0;
  }

  stop() {
    const sources = [...this.sources];
    this.sources.clear();
    for (const source of sources) {
      try { source.stop(); } catch { /* not started yet */ }
    }
    this.nextTime = 0;
  }
}
