// AudioWorklet: the microphone at the context's rate -> mono -> 16 kHz -> PCM16 LE chunks.
// Posts an ArrayBuffer of `chunkSamples` samples (100 ms by default) on its port; on the message
// "flush" it posts what it holds (maybe less), then the string "flushed".
import { Resampler, toPcm16 } from "./resample.js";

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, chunkSamples = 1600 } = options.processorOptions || {};
    this.resampler = new Resampler(sampleRate, targetRate); // sampleRate: the worklet scope's global
    this.chunk = new Float32Array(chunkSamples);
    this.fill = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.post(this.fill);
        this.port.postMessage("flushed");
      }
    };
  }

  post(n) {
    if (n > 0) {
      const bytes = toPcm16(this.chunk.subarray(0, n));
      this.port.postMessage(bytes.buffer, [bytes.buffer]);
    }
    this.fill = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) {
      let mono = channels[0];
      if (channels.length > 1) {
        mono = new Float32Array(channels[0].length);
        for (const channel of channels) {
          for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
        }
      }
      const out = this.resampler.process(mono);
      for (let i = 0; i < out.length; i++) {
        this.chunk[this.fill++] = out[i];
        if (this.fill === this.chunk.length) this.post(this.fill);
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
