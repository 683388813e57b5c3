// Streaming resampler (windowed-sinc, Blackman window), shared by the capture worklet and the
// file path of demo.js. Pure: no DOM, no Web Audio, so it runs in an AudioWorkletGlobalScope.
//
//   const r = new Resampler(48000, 16000);
//   const out = r.process(float32Block);   // any block size; state is kept between calls
//   const tail = r.flush();                // the last samples once the input has ended
//
// Downsampling filters below the output's Nyquist frequency (cut-off at 95 % of it), so speech
// captured at 44.1 or 48 kHz does not alias into the 16 kHz stream Whisper hears.

const ZEROS = 10; // zero crossings of the kernel on each side
const TABLE_RES = 512; // kernel samples per zero crossing (linear interpolation between them)

function buildTable() {
  const n = ZEROS * TABLE_RES + 2;
  const table = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const x = i / TABLE_RES; // in zero crossings
    const r = Math.min(1, x / ZEROS);
    const w = 0.42 + 0.5 * Math.cos(Math.PI * r) + 0.08 * Math.cos(2 * Math.PI * r);
    table[i] = (x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x)) * w;
  }
  return table;
}

let TABLE = null;

export class Resampler {
  constructor(inRate, outRate = 16000) {
    if (!(inRate > 0 && outRate > 0)) throw new RangeError(`bad rates ${inRate} -> ${outRate}`);
    TABLE ??= buildTable();
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    this.fc = 0.95 * Math.min(1, outRate / inRate); // cut-off, as a fraction of the input's Nyquist
    this.halfWidth = ZEROS / this.fc; // kernel half-length in input samples
    this.buf = new Float32Array(0); // input not yet fully used
    this.t = 0; // position of the next output sample in buf
    this.passThrough = inRate === outRate;
  }

  process(input) {
    if (this.passThrough) return Float32Array.from(input);
    const buf = new Float32Array(this.buf.length + input.length);
    buf.set(this.buf);
    buf.set(input, this.buf.length);
    const hw = this.halfWidth;
    const fc = this.fc;
    const count = Math.max(0, Math.ceil((buf.length - hw - this.t) / this.step));
    const out = new Float32Array(count);
    let t = this.t;
    for (let k = 0; k < count; k++, t += this.step) {
      const lo = Math.max(0, Math.ceil(t - hw));
      const hi = Math.min(buf.length - 1, Math.floor(t + hw));
      let acc = 0;
      for (let i = lo; i <= hi; i++) {
        const u = Math.abs(i - t) * fc * TABLE_RES;
        const j = u | 0;
        const frac = u - j;
        acc += buf[i] * (TABLE[j] + (TABLE[j + 1] - TABLE[j]) * frac);
      }
      out[k] = acc * fc;
    }
    const drop = Math.max(0, Math.min(buf.length, Math.floor(t - hw)));
    this.buf = buf.slice(drop);
    this.t = t - drop;
    return out;
  }

  flush() {
    // Zeros after the end give the last output samples their right-hand half.
    return this.process(new Float32Array(Math.ceil(this.halfWidth) + 1));
  }

  // A whole recording at once: exactly round(n * outRate / inRate) samples.
  static resampleAll(samples, inRate, outRate = 16000) {
    const r = new Resampler(inRate, outRate);
    const head = r.process(samples);
    const tail = r.flush();
    const n = Math.round((samples.length * outRate) / inRate);
    const out = new Float32Array(n);
    out.set(head.subarray(0, n));
    if (head.length < n) out.set(tail.subarray(0, n - head.length), head.length);
    return out;
  }
}

// Float32 in [-1, 1] -> PCM16 little-endian bytes (the inverse of the server's x / 32768).
export function toPcm16(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.round(samples[i] * 32768);
    view.setInt16(2 * i, s > 32767 ? 32767 : s < -32768 ? -32768 : s, true);
  }
  return bytes;
}
