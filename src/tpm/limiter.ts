// Bounds how many libtpms calls occupy the libuv thread pool at once. The pool also runs fs work (the
// directory store's writes and fsyncs); if every pool thread held an RSA key generation, the store
// could not make a response durable until one finished. So TPM calls get `size` threads, fs keeps the
// rest, and extra TPM calls wait here in FIFO order.
export class Limiter {
  #running = 0;
  #waiting: Array<() => void> = [];

  constructor(readonly size: number) {
    if (!Number.isInteger(size) || size < 1) throw new RangeError(`limiter size ${size}`);
  }

  get running(): number {
    return this.#running;
  }

  get waiting(): number {
    return this.#waiting.length;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#running >= this.size) await new Promise<void>((r) => this.#waiting.push(r));
    else this.#running++;
    try {
      return await fn();
    } finally {
      const next = this.#waiting.shift();
      // Hand the slot straight to the next waiter so a newcomer cannot overtake it.
      if (next) next();
      else this.#running--;
    }
  }
}
