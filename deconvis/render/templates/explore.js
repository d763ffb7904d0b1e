(function(){
// the live explorer: layer tabs, the layer's maps as a grid (one sheet image, a window per
// channel), the chosen channel enlarged, a click on one of its units -> its projections by each
// rule on the displayed image and its RF box; the run's top-k of the channel beside them.
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const VIEW = 240;   // CSS pixels of the enlarged map, the photo and each projection (longer side)
const TILE = 56;    // CSS pixels of a map in the grid (longer side)
const PROJ = 176;   // CSS pixels of each projection (longer side): the three rules side by side
const st = {image: null, li: 0, ch: 0, sheet: null, seq: 0, useq: 0};
const scale = VIEW / Math.max(D.input_size[0], D.input_size[1]);
const pscale = PROJ / Math.max(D.input_size[0], D.input_size[1]);

function el(tag, cls, txt){ const e = document.createElement(tag); if(cls) e.className = cls; if(txt !== undefined) e.textContent = txt; return e; }
function fmt(v){ return v === null || v === undefined ? '-' : Number(v).toPrecision(3).replace(/\.?0+$/, '').replace(/\.?0+e/, 'e'); }
function q(params){ return Object.entries(params).map(([k, v]) => k + '=' + encodeURIComponent(v)).join('&'); }
function busy(text){ $('busy').textContent = text; }
function showError(msg){ const e = $('error'); e.textContent = msg; e.classList.add('on'); busy(''); }
function clearError(){ const e = $('error'); e.textContent = ''; e.classList.remove('on'); }
async function api(url, opts){
  const r = await fetch(url, opts);
  let body = null;
  try { body = await r.json(); } catch(e) { body = null; }
  if(!r.ok) throw new Error((body && body.error) || ('HTTP ' + r.status + ' for ' + url));
  return body;
}
function layer(){ return D.layers[st.li]; }
function px(v){ return v + 'px'; }

// one window onto a sheet image: tile (row, col) of size h x w, gap pixels apart, shown at s
function windowOn(d, url, S, c, h, w, s){
  const rows = Math.ceil(layer().channels / S.cols);
  const sw = S.cols * (w + S.gap) - S.gap, sh = rows * (h + S.gap) - S.gap;
  const r = Math.floor(c / S.cols), k = c % S.cols;
  d.style.width = px(w * s); d.style.height = px(h * s);
  d.style.backgroundImage = 'url("' + url + '")';
  d.style.backgroundSize = px(sw * s) + ' ' + px(sh * s);
  d.style.backgroundPosition = px(-k * (w + S.gap) * s) + ' ' + px(-r * (h + S.gap) * s);
}

function buildNav(){
  const nav = $('layers');
  D.layers.forEach((L, i) => {
    const b = el('button', '', L.label); b.dataset.li = i; b.title = L.name;
    b.addEventListener('click', () => setLayer(i));
    nav.appendChild(b);
  });
}

function buildImages(){
  const sel = $('image');
  sel.textContent = '';
  if(!D.images.length){ const o = el('option', '', '(upload an image)'); o.value = ''; sel.appendChild(o); }
  D.images.forEach(im => { const o = el('option', '', im.name); o.value = im.id; sel.appendChild(o); });
  sel.addEventListener('change', () => { if(sel.value) setImage(sel.value); sel.blur(); });
}

function setImage(id){
  clearError();
  st.image = id; $('image').value = id;
  const img = $('photo').querySelector('img');
  img.src = 'api/image/' + encodeURIComponent(id);
  $('photo').querySelector('.rfbox').hidden = true;
  $('proj').textContent = ''; $('uinfo').textContent = 'the image';
  loadLayer();
}

function setLayer(i){
  if(i < 0 || i >= D.layers.length) return;
  clearError();
  st.li = i; loadLayer();
}

async function loadLayer(){
  const L = layer();
  document.querySelectorAll('#layers button').forEach(b => b.classList.toggle('active', Number(b.dataset.li) === st.li));
  $('lname').textContent = L.label + (L.label !== L.name ? ' (' + L.name + ')' : '');
  $('linfo').textContent = L.channels + ' channels \u00b7 map ' + L.map_size[0] + '\u00d7' + L.map_size[1]
    + (L.rf ? ' \u00b7 RF ' + L.rf[0] + '\u00d7' + L.rf[1] + ' px' : '');
  $('proj').textContent = ''; $('mark').style.display = 'none';
  st.sheet = null; $('grid').dataset.layer = '';  // until this layer's maps arrive, clicks and keys wait
  if(!st.image){ $('grid').textContent = ''; return; }
  const seq = ++st.seq, t0 = performance.now();
  busy('computing ' + L.label + ' ...');
  try {
    const S = await api('api/maps?' + q({image: st.image, layer: L.name}));
    if(seq !== st.seq) return;
    st.sheet = S;
    buildGrid(L, S);
    busy(L.label + ': ' + L.channels + ' maps in ' + Math.round(performance.now() - t0) + ' ms');
    selectChannel(Math.min(st.ch, L.channels - 1));
  } catch(e) { showError(e.message); }
}

function buildGrid(L, S){
  const grid = $('grid'); grid.textContent = ''; grid.dataset.layer = L.name;
  const [h, w] = S.map_size, s = TILE / Math.max(h, w);
  for(let c = 0; c < L.channels; c++){
    const d = el('div', 'map'); d.dataset.c = c;
    windowOn(d, S.png, S, c, h, w, s);
    d.title = 'channel ' + c + ' \u00b7 max ' + fmt(S.max[c]);
    d.addEventListener('click', () => selectChannel(c));
    grid.appendChild(d);
  }
}

function selectChannel(c){
  const L = layer(), S = st.sheet;
  if(!S || c < 0 || c >= L.channels) return;
  st.ch = c;
  document.querySelectorAll('#grid .map.sel').forEach(d => d.classList.remove('sel'));
  const tile = document.querySelector('#grid .map[data-c="' + c + '"]');
  if(tile){ tile.classList.add('sel'); if(tile.scrollIntoView) tile.scrollIntoView({block: 'nearest'}); }
  const [h, w] = S.map_size, s = VIEW / Math.max(h, w);
  windowOn($('big'), S.png, S, c, h, w, s);
  $('big').dataset.s = s;
  $('mark').style.display = 'none';
  $('chead').textContent = L.label + ' \u00b7 channel ' + c + ' \u00b7 max ' + fmt(S.max[c]) + ' at (' + S.argmax[c].join(', ') + ')';
  loadChannel(L, c);
}

function pic(url, cell, k, rank, row, size){
  const [h, w] = cell, s = size / Math.max(h, w);
  const d = el('div', 'pic'); d.style.width = px(Math.round(w * s)); d.style.height = px(Math.round(h * s));
  const im = new Image(); im.src = url; im.alt = (row ? 'patch' : 'reconstruction') + ' rank ' + rank;
  im.style.width = px(k * w * s); im.style.height = px(2 * h * s);
  im.style.marginLeft = px(-rank * w * s); im.style.marginTop = px(-row * h * s);
  d.appendChild(im); return d;
}

async function loadChannel(L, c){
  const top = $('top'), page = $('page');
  top.textContent = ''; page.textContent = '';
  if(!D.run){ $('tophead').textContent = 'Top images: start the explorer on a run (deconvis visualize) to see them'; return; }
  try {
    const r = await api('api/channel?' + q({layer: L.name, channel: c}));
    if(L !== layer() || c !== st.ch) return;
    const T = r.top;
    if(!T){ $('tophead').textContent = 'Top images: the run did not mine this channel'; return; }
    $('tophead').textContent = 'Top-' + T.k + ' of ' + L.label + ' channel ' + c + ' over the run\u2019s images';
    if(T.sprite && T.cell){
      [0, 1].forEach(row => {
        const line = el('div', 'toprow');
        T.winners.forEach(w => { const p = pic(T.sprite, T.cell, T.k, w.rank, row, 52); p.title = 'rank ' + w.rank + ' \u00b7 ' + fmt(w.activation) + ' \u00b7 ' + w.source; line.appendChild(p); });
        top.appendChild(line);
      });
    } else {
      top.appendChild(el('span', '', 'not projected yet'));
    }
    if(T.page){ const a = el('a', '', 'unit page of ' + L.label + ' channel ' + c); a.href = T.page; a.target = '_blank'; a.id = 'pagelink'; page.appendChild(a); }
  } catch(e) { showError(e.message); }
}

$('big').addEventListener('click', ev => {
  const S = st.sheet; if(!S) return;
  const r = $('big').getBoundingClientRect(), s = Number($('big').dataset.s);
  const y = Math.min(S.map_size[0] - 1, Math.max(0, Math.floor((ev.clientY - r.top) / s)));
  const x = Math.min(S.map_size[1] - 1, Math.max(0, Math.floor((ev.clientX - r.left) / s)));
  projectUnit(y, x);
});

async function projectUnit(y, x){
  const L = layer(), c = st.ch, s = Number($('big').dataset.s), useq = ++st.useq;
  const m = $('mark'); m.style.display = 'block';
  m.style.left = px(x * s - 2); m.style.top = px(y * s - 2); m.style.width = px(s); m.style.height = px(s);
  clearError();
  const t0 = performance.now();
  try {
    const u = await api('api/unit?' + q({image: st.image, layer: L.name, channel: c, y: y, x: x}));
    if(useq !== st.useq) return;
    const ms = Math.round(performance.now() - t0);
    busy(L.label + ' channel ' + c + ' unit (' + y + ', ' + x + '): projections in ' + ms + ' ms (backward ' + Math.round(u.seconds * 1000) + ' ms)');
    const [bh, bw] = [u.box[1] - u.box[0], u.box[3] - u.box[2]];
    const rb = $('photo').querySelector('.rfbox'); rb.hidden = false;
    rb.style.top = px(u.box[0] * scale); rb.style.left = px(u.box[2] * scale);
    rb.style.height = px(bh * scale); rb.style.width = px(bw * scale);
    $('uinfo').textContent = 'RF box y ' + u.box[0] + '..' + u.box[1] + ', x ' + u.box[2] + '..' + u.box[3] + ' px \u00b7 activation ' + fmt(u.activation);
    const proj = $('proj'); proj.textContent = '';
    D.rules.forEach(rule => {
      if(!u.projections[rule]) return;
      const f = el('figure', 'projection'); f.dataset.rule = rule;
      const cv = el('div', 'canvas'); cv.style.width = px(D.input_size[1] * pscale); cv.style.height = px(D.input_size[0] * pscale);
      const im = new Image(); im.alt = rule + ' projection'; im.src = u.projections[rule];
      im.style.top = px(u.window[0] * pscale); im.style.left = px(u.window[2] * pscale);
      im.style.height = px((u.window[1] - u.window[0]) * pscale); im.style.width = px((u.window[3] - u.window[2]) * pscale);
      cv.appendChild(im);
      const b = el('div', 'rfbox'); b.style.top = px(u.box[0] * pscale); b.style.left = px(u.box[2] * pscale);
      b.style.height = px(bh * pscale); b.style.width = px(bw * pscale);
      cv.appendChild(b);
      f.appendChild(cv); f.appendChild(el('figcaption', '', rule));
      proj.appendChild(f);
    });
  } catch(e) { showError(e.message); }
}

$('upload').addEventListener('change', async ev => {
  const f = ev.target.files[0]; if(!f) return;
  clearError(); busy('uploading ' + f.name + ' ...');
  try {
    const r = await api('api/upload?' + q({name: f.name}), {method: 'POST', body: f});
    D.images.push({id: r.id, name: r.name});
    const o = el('option', '', r.name + ' (upload)'); o.value = r.id; $('image').appendChild(o);
    setImage(r.id);
  } catch(e) { showError(e.message); }
  ev.target.value = '';
});

document.addEventListener('keydown', ev => {
  const t = ev.target.tagName;
  if(t === 'INPUT' || t === 'SELECT' || t === 'TEXTAREA' || ev.altKey || ev.ctrlKey || ev.metaKey) return;
  const L = layer();
  if(ev.key === 'ArrowRight') selectChannel(Math.min(st.ch + 1, L.channels - 1));
  else if(ev.key === 'ArrowLeft') selectChannel(Math.max(st.ch - 1, 0));
  else if(ev.key === 'ArrowDown') setLayer(st.li + 1);
  else if(ev.key === 'ArrowUp') setLayer(st.li - 1);
  else if(ev.key === 'Enter' && st.sheet){ const a = st.sheet.argmax[st.ch]; projectUnit(a[0], a[1]); }
  else return;
  ev.preventDefault();
});

$('photo').style.width = px(D.input_size[1] * scale); $('photo').style.height = px(D.input_size[0] * scale);
buildNav(); buildImages();
if(D.images_note) busy(D.images_note);
if(D.images.length) setImage(D.images[0].id); else loadLayer();
})();
