// A small line chart on a canvas: points are [x, y] pairs; marks are x positions drawn as red
// dashed lines (the guard's rollbacks on the validation curve).
export function drawChart(canvas, points, { xLabel = '', yLabel = '', color = '#1f6feb', marks = [] } = {}) {
  const ctx = canvas.getContext('2d');
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  ctx.font = '12px system-ui, sans-serif';
  ctx.fillStyle = '#666';
  if (points.length === 0) {
    ctx.fillText('no data yet', 12, h / 2);
    return;
  }
  const pad = { l: 52, r: 12, t: 12, b: 26 };
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = y => pad.t + (1 - (y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = '#ddd';
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, h - pad.b); ctx.lineTo(w - pad.r, h - pad.b);
  ctx.stroke();
  ctx.fillText(y1.toFixed(3), 4, pad.t + 8);
  ctx.fillText(y0.toFixed(3), 4, h - pad.b);
  ctx.fillText(String(x0), pad.l, h - 8);
  const right = String(x1);
  ctx.fillText(right, w - pad.r - ctx.measureText(right).width, h - 8);
  const mid = `${xLabel}${yLabel ? ' — ' + yLabel : ''}`;
  ctx.fillText(mid, (w - ctx.measureText(mid).width) / 2, h - 8);
  ctx.save();
  ctx.strokeStyle = '#d1242f';
  ctx.setLineDash([4, 3]);
  for (const x of marks.filter(x => x >= x0 && x <= x1)) {
    ctx.beginPath(); ctx.moveTo(X(x), pad.t); ctx.lineTo(X(x), h - pad.b); ctx.stroke();
  }
  ctx.restore();
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
  ctx.stroke();
  ctx.fillStyle = color;
  for (const [x, y] of points.slice(-1)) { ctx.beginPath(); ctx.arc(X(x), Y(y), 3, 0, 7); ctx.fill(); }
}
