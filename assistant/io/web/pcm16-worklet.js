"use strict";
// The microphone for the page: an AudioWorklet running at 16 kHz (the browser resamples) that posts PCM16 blocks of
// 100 ms to the page, which sends them to /v1/realtime as binary frames.
class Pcm16 extends AudioWorkletProcessor {
  constructor() { super(); this.buffer = new Int16Array(1600); this.filled = 0; }
  process(inputs) {
    const channel = inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.buffer[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === this.buffer.length) { this.port.postMessage(this.buffer.buffer.slice(0)); this.filled = 0; }
    }
    return true;
  }
}
registerProcessor("pcm16", Pcm16);
