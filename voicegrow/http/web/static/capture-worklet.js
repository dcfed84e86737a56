// AudioWorklet: the microphone as 16 kHz 16-bit PCM in 20 ms frames, posted to the page, which puts
// each in an AUDIO frame. The context runs at the device's own rate (browsers differ in whether a
// microphone may feed a context at another rate), so the resampling happens here: a windowed-sinc
// low-pass below the target's Nyquist frequency, then linear interpolation at the target's instants.

const TAPS = 63;

function lowPass(cutoff) {
  // cutoff: a fraction of the input rate; Blackman window.
  const taps = new Float32Array(TAPS);
  const mid = (TAPS - 1) / 2;
  let sum = 0;
  for (let i = 0; i < TAPS; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const window = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (TAPS - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (TAPS - 1));
    taps[i] = sinc * window;
    sum += taps[i];
  }
  for (let i = 0; i < TAPS; i++) taps[i] /= sum;
  return taps;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const target = (options.processorOptions && options.processorOptions.targetRate) || sampleRate;
    this.size = Math.round(target / 50);
    this.frame = new Int16Array(this.size);
    this.filled = 0;
    this.step = sampleRate / target; // input samples per output sample
    this.resample = this.step !== 1;
    if (this.resample) {
      this.taps = lowPass((0.45 * target) / sampleRate);
      this.history = new Float32Array(TAPS); // ring buffer of the last inputs
      this.at = 0;
      this.n = 0; // inputs seen
      this.next = 0; // input time of the next output sample
      this.previous = 0; // the filtered sample before the current one
    }
  }

  emit(value) {
    const s = Math.max(-1, Math.min(1, value));
    this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.filled === this.size) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]); // transferred: the array is now empty
      this.frame = new Int16Array(this.size);
      this.filled = 0;
    }
  }

  filtered(x) {
    this.history[this.at] = x;
    this.at = (this.at + 1) % TAPS;
    let y = 0;
    for (let i = 0, j = this.at; i < TAPS; i++, j = (j + 1) % TAPS) y += this.taps[i] * this.history[j];
    return y;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      if (!this.resample) {
        this.emit(channel[i]);
        continue;
      }
      const y = this.filtered(channel[i]);
      // Outputs whose instant falls between the previous input (n - 1) and this one (n).
      while (this.next <= this.n) {
        const frac = 1 - (this.n - this.next);
        this.emit(this.previous + (y - this.previous) * frac);
        this.next += this.step;
      }
      this.previous = y;
      this.n += 1;
    }
    return true;
  }
}

registerProcessor("voicegrow-capture", CaptureProcessor);
