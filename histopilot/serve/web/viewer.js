// A Deep Zoom viewer on a canvas: pan, zoom, fly to a region, and overlays in level-0 pixels.
//
// The view is a centre (level-0 pixels) and a scale (screen pixels per level-0 pixel). Each
// frame draws the finest loaded tiles under the view, coarser levels first, so the picture
// sharpens as tiles arrive instead of flashing blank.

const MAX_PARALLEL_FETCHES = 6;
const MAX_CACHED_TILES = 600;
const COARSER_LEVELS_DRAWN = 4;
const RETRY_AFTER_MS = 2000;
const REGION_COLOURS = { low: "#56b4e9", medium: "#e69f00", high: "#d55e00" };

export class DeepZoomViewer {
  constructor(canvas, fetchImage) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.fetchImage = fetchImage; // url -> Promise<ImageBitmap>
    this.slide = null;
    this.view = { x: 0, y: 0, scale: 1 };
    this.tiles = new Map(); // url -> {image, state, used}
    this.queue = [];
    this.fetching = 0;
    this.tilesLoaded = 0;
    this.overlays = { tissue: null, heatmap: null, regions: [] };
    this.show = { tissue: true, heatmap: false, regions: true };
    this.highlighted = null;
    this.listeners = [];
    this._bindInput();
    new ResizeObserver(() => this._resize()).observe(canvas);
    this._resize();
  }

  // -- slide ------------------------------------------------------------------------------
  open(baseUrl, descriptorXml) {
    const doc = new DOMParser().parseFromString(descriptorXml, "application/xml");
    const image = doc.documentElement;
    const size = image.getElementsByTagName("Size")[0];
    const width = Number(size.getAttribute("Width"));
    const height = Number(size.getAttribute("Height"));
    this.slide = {
      baseUrl,
      width,
      height,
      tileSize: Number(image.getAttribute("TileSize")),
      overlap: Number(image.getAttribute("Overlap")),
      format: image.getAttribute("Format"),
      maxLevel: Math.ceil(Math.log2(Math.max(width, height))),
    };
    this.tiles.clear();
    this.queue = [];
    this.tilesLoaded = 0;
    this.overlays = { tissue: null, heatmap: null, regions: [] };
    this.highlighted = null;
    this.home();
  }

  home() {
    if (!this.slide) return;
    const scale = 0.95 * Math.min(this.width / this.slide.width, this.height / this.slide.height);
    this._set({ x: this.slide.width / 2, y: this.slide.height / 2, scale });
  }

  zoomBy(factor, screenX = this.width / 2, screenY = this.height / 2) {
    if (!this.slide) return;
    const before = this.toSlide(screenX, screenY);
    const scale = this._clampScale(this.view.scale * factor);
    const x = before.x - (screenX - this.width / 2) / scale;
    const y = before.y - (screenY - this.height / 2) / scale;
    this._set({ x, y, scale });
  }

  // Move so that the level-0 box fills most of the view, animated.
  flyTo(box, { duration = 450, highlight = null } = {}) {
    if (!this.slide) return;
    const target = {
      x: box.x + box.width / 2,
      y: box.y + box.height / 2,
      scale: this._clampScale(0.7 * Math.min(this.width / box.width, this.height / box.height)),
    };
    this.highlighted = highlight;
    const start = { ...this.view };
    const began = performance.now();
    const step = (now) => {
      const t = Math.min(1, (now - began) / duration);
      const ease = t < 0.5 ? 2 * t * t : 1 - (-2 * t + 2) ** 2 / 2;
      const logScale = Math.log(start.scale) + (Math.log(target.scale) - Math.log(start.scale)) * ease;
      this._set({
        x: start.x + (target.x - start.x) * ease,
        y: start.y + (target.y - start.y) * ease,
        scale: Math.exp(logScale),
      });
      if (t < 1) requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
  }

  toSlide(screenX, screenY) {
    return {
      x: this.view.x + (screenX - this.width / 2) / this.view.scale,
      y: this.view.y + (screenY - this.height / 2) / this.view.scale,
    };
  }

  onChange(listener) {
    this.listeners.push(listener);
  }

  // -- overlays -----------------------------------------------------------------------------
  setTissue(geojson) {
    this.overlays.tissue = geojson;
    this.draw();
  }

  async setHeatmap(importance) {
    const image = new Image();
    image.src = importance.image;
    await image.decode();
    this.overlays.heatmap = { image, width: importance.columns * importance.tile_size,
      height: importance.rows * importance.tile_size };
    this.draw();
  }

  // regions: [{region_id, x, y, width, height, magnification}]
  setRegions(regions) {
    const known = new Map(this.overlays.regions.map((r) => [r.region_id, r]));
    for (const region of regions) known.set(region.region_id, region);
    this.overlays.regions = [...known.values()];
    this.draw();
  }

  // -- drawing ------------------------------------------------------------------------------
  draw() {
    if (this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this._paint();
    });
  }

  _paint() {
    const ctx = this.context;
    ctx.setTransform(devicePixelRatio, 0, 0, devicePixelRatio, 0, 0);
    ctx.clearRect(0, 0, this.width, this.height);
    if (!this.slide) return;
    const wanted = this._levelFor(this.view.scale);
    for (let level = Math.max(0, wanted - COARSER_LEVELS_DRAWN); level <= wanted; level++) {
      this._drawLevel(level, level === wanted);
    }
    this._drawOverlays();
    this._pump();
  }

  _drawLevel(level, request) {
    const { tileSize, overlap, maxLevel, width, height } = this.slide;
    const factor = 2 ** (maxLevel - level); // level-0 pixels per pixel of this level
    const levelWidth = Math.ceil(width / factor);
    const levelHeight = Math.ceil(height / factor);
    const topLeft = this.toSlide(0, 0);
    const bottomRight = this.toSlide(this.width, this.height);
    const columns = Math.ceil(levelWidth / tileSize);
    const rows = Math.ceil(levelHeight / tileSize);
    const c0 = Math.max(0, Math.floor(topLeft.x / factor / tileSize));
    const r0 = Math.max(0, Math.floor(topLeft.y / factor / tileSize));
    const c1 = Math.min(columns - 1, Math.floor(bottomRight.x / factor / tileSize));
    const r1 = Math.min(rows - 1, Math.floor(bottomRight.y / factor / tileSize));
    const ctx = this.context;
    for (let row = r0; row <= r1; row++) {
      for (let column = c0; column <= c1; column++) {
        const url = `${this.slide.baseUrl}/dzi_files/${level}/${column}_${row}.${this.slide.format}`;
        const tile = this.tiles.get(url);
        if (tile && tile.state === "ready") {
          tile.used = performance.now();
          const left = (column * tileSize - (column > 0 ? overlap : 0)) * factor;
          const top = (row * tileSize - (row > 0 ? overlap : 0)) * factor;
          const screen = this._toScreen(left, top);
          ctx.drawImage(tile.image, screen.x, screen.y,
            tile.image.width * factor * this.view.scale, tile.image.height * factor * this.view.scale);
        } else if (request && !tile) {
          this.tiles.set(url, { state: "queued", used: performance.now() });
          this.queue.push(url);
        }
      }
    }
  }

  _drawOverlays() {
    const ctx = this.context;
    const { heatmap, tissue, regions } = this.overlays;
    if (this.show.heatmap && heatmap) {
      const at = this._toScreen(0, 0);
      ctx.save();
      ctx.globalAlpha = 0.45;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(heatmap.image, at.x, at.y, heatmap.width * this.view.scale,
        heatmap.height * this.view.scale);
      ctx.restore();
    }
    if (this.show.tissue && tissue) {
      ctx.save();
      ctx.strokeStyle = "#1b9e3e";
      ctx.lineWidth = 1.5;
      for (const feature of tissue.features || []) {
        for (const ring of feature.geometry.coordinates || []) {
          ctx.beginPath();
          ring.forEach(([x, y], index) => {
            const p = this._toScreen(x, y);
            index ? ctx.lineTo(p.x, p.y) : ctx.moveTo(p.x, p.y);
          });
          ctx.closePath();
          ctx.stroke();
        }
      }
      ctx.restore();
    }
    if (this.show.regions) {
      ctx.save();
      ctx.font = "12px system-ui, sans-serif";
      regions.forEach((region, index) => {
        const p = this._toScreen(region.x, region.y);
        const w = region.width * this.view.scale;
        const h = region.height * this.view.scale;
        const bright = region.region_id === this.highlighted;
        ctx.strokeStyle = REGION_COLOURS[region.magnification] || "#0b63c5";
        ctx.lineWidth = bright ? 4 : 2;
        ctx.strokeRect(p.x, p.y, w, h);
        const label = `${index + 1} · ${region.region_id}`;
        const labelWidth = ctx.measureText(label).width + 6;
        ctx.fillStyle = "rgba(255,255,255,.85)";
        ctx.fillRect(p.x, p.y - 16, labelWidth, 16);
        ctx.fillStyle = "#1d2330";
        ctx.fillText(label, p.x + 3, p.y - 4);
      });
      ctx.restore();
    }
  }

  _pump() {
    while (this.fetching < MAX_PARALLEL_FETCHES && this.queue.length) {
      const url = this.queue.pop(); // newest first: what the view wants now
      const tile = this.tiles.get(url);
      if (!tile || tile.state !== "queued") continue;
      tile.state = "loading";
      this.fetching++;
      this.fetchImage(url)
        .then((image) => {
          tile.image = image;
          tile.state = "ready";
          this.tilesLoaded++;
        })
        .catch(() => {
          // Asked again once the view next changes after a short pause (a busy server, a
          // rate limit), instead of leaving a hole.
          tile.state = "failed";
          setTimeout(() => this.tiles.get(url) === tile && this.tiles.delete(url), RETRY_AFTER_MS);
        })
        .finally(() => {
          this.fetching--;
          this._evict();
          this.draw();
        });
    }
  }

  _evict() {
    if (this.tiles.size <= MAX_CACHED_TILES) return;
    const ready = [...this.tiles.entries()].filter(([, t]) => t.state === "ready" || t.state === "failed");
    ready.sort((a, b) => a[1].used - b[1].used);
    for (const [url, tile] of ready.slice(0, this.tiles.size - MAX_CACHED_TILES)) {
      if (tile.image && tile.image.close) tile.image.close();
      this.tiles.delete(url);
    }
  }

  // -- geometry -----------------------------------------------------------------------------
  _levelFor(scale) {
    const level = this.slide.maxLevel + Math.ceil(Math.log2(scale * devicePixelRatio));
    return Math.max(0, Math.min(this.slide.maxLevel, level));
  }

  _clampScale(scale) {
    const fit = Math.min(this.width / this.slide.width, this.height / this.slide.height);
    return Math.max(fit / 4, Math.min(8, scale));
  }

  _toScreen(x, y) {
    return {
      x: (x - this.view.x) * this.view.scale + this.width / 2,
      y: (y - this.view.y) * this.view.scale + this.height / 2,
    };
  }

  _set(view) {
    this.view = view;
    this.queue = [];
    for (const [url, tile] of this.tiles) if (tile.state === "queued") this.tiles.delete(url);
    this.draw();
    for (const listener of this.listeners) listener(view);
  }

  _resize() {
    const rect = this.canvas.getBoundingClientRect();
    this.width = Math.max(1, rect.width);
    this.height = Math.max(1, rect.height);
    this.canvas.width = Math.round(this.width * devicePixelRatio);
    this.canvas.height = Math.round(this.height * devicePixelRatio);
    this.draw();
  }

  _bindInput() {
    const canvas = this.canvas;
    let drag = null;
    canvas.addEventListener("pointerdown", (event) => {
      drag = { x: event.clientX, y: event.clientY, view: { ...this.view } };
      canvas.setPointerCapture(event.pointerId);
      canvas.classList.add("dragging");
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drag) return;
      this._set({
        x: drag.view.x - (event.clientX - drag.x) / this.view.scale,
        y: drag.view.y - (event.clientY - drag.y) / this.view.scale,
        scale: this.view.scale,
      });
    });
    const end = () => {
      drag = null;
      canvas.classList.remove("dragging");
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      const rect = canvas.getBoundingClientRect();
      this.zoomBy(Math.exp(-event.deltaY * 0.0015), event.clientX - rect.left, event.clientY - rect.top);
    }, { passive: false });
    canvas.addEventListener("keydown", (event) => {
      if (event.key === "+" || event.key === "=") this.zoomBy(1.5);
      else if (event.key === "-") this.zoomBy(1 / 1.5);
      else if (event.key === "0") this.home();
    });
  }
}
