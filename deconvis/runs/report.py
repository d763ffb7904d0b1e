"""``index.html``: a static, self-contained report to browse a top-k run.

One file with inline CSS and JavaScript and relative links to the run's images (open it straight
from disk, or serve the run folder). Each tile is a window onto its channel's sprite (one image per
channel, :mod:`deconvis.render.sprites`: column = rank, row 0 reconstruction, row 1 patch), so a
channel costs the browser one request; tiles of version-1 runs (one file each) show as before. A tab per layer; per channel the k reconstructions beside
the k image patches, with activation values and source names; click a tile to enlarge it. The
data (from ``results.json``) is embedded as JSON and each layer's thumbnails are built when its
tab is first opened, so reports of large networks (VGG16: 4224 channels) stay quick.
"""
from __future__ import annotations

import html
import json
import os
from typing import Any, Dict, List

from deconvis.io.atomic import write_text
from deconvis.runs.results import Results

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#f4f4f2}
header{padding:12px 18px;background:#263238;color:#eceff1}
header h1{font-size:19px;margin:0 0 4px}
header .meta{font-size:12.5px;color:#b0bec5}
nav{display:flex;flex-wrap:wrap;gap:4px;padding:8px 18px;background:#37474f;position:sticky;top:0;z-index:5}
nav button{border:0;border-radius:4px;padding:5px 11px;background:#546e7a;color:#fff;cursor:pointer;font-size:13px}
nav button.active{background:#ffb300;color:#000;font-weight:600}
main{padding:12px 18px}
section.layer,section.analysis{display:none}
section.layer.active,section.analysis.active{display:block}
.nojs section.layer,.nojs section.analysis{display:block}
nav button.an{background:#00695c}
table.keys{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
table.keys th,table.keys td{border:1px solid #ccc;padding:3px 8px;text-align:left}
table.keys td.num{text-align:right;font-family:monospace}
section.analysis img.fig{max-width:100%;border:1px solid #ddd;background:#fff}
section.analysis .files a{margin-right:8px;font-size:12.5px}
.lhead{display:flex;flex-wrap:wrap;align-items:baseline;gap:14px;margin:4px 0 10px}
.lhead h2{margin:0;font-size:17px}
.lhead .info{color:#555;font-size:12.5px}
.sheets a{margin-right:6px;font-size:12.5px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.ch{background:#fff;border:1px solid #ddd;border-radius:5px;padding:6px}
.ch h3{margin:0 0 4px;font-size:12.5px;color:#1a237e}
.ch h3.dead{color:#b71c1c}
.pair{display:flex;gap:8px}
.tiles{display:grid;gap:2px}
.t{position:relative;cursor:zoom-in;line-height:0}
.pic{overflow:hidden;background:#888;line-height:0}
.pic img{display:block;max-width:none;image-rendering:pixelated}
.pic img.whole{width:100%;height:100%;object-fit:contain}
.t span{position:absolute;left:1px;bottom:1px;font:10px/1 monospace;color:#fff;background:rgba(0,0,0,.55);padding:1px 2px}
.empty{width:var(--tile);height:var(--tile);background:#e0e0e0}
#box{display:none;position:fixed;inset:0;background:rgba(0,0,0,.82);z-index:10;align-items:center;justify-content:center;flex-direction:column;color:#eee}
#box.on{display:flex}
#box .big{display:flex;gap:14px}
#box .pic{border:0}
#box p{margin:10px 0 0;font-size:13.5px;max-width:860px;text-align:center}
#box small{color:#aaa}
.toolbar{margin:0 0 10px;font-size:13px}
.toolbar input{width:6em}
"""

_JS = r"""
(function(){
document.body.classList.remove('nojs');
const D = JSON.parse(document.getElementById('data').textContent);
const built = {};
const nav = document.querySelector('nav');
const box = document.getElementById('box');
let current = null;
function el(tag, cls, txt){const e=document.createElement(tag); if(cls) e.className=cls; if(txt!==undefined) e.textContent=txt; return e;}
function fmt(v){return Number(v).toPrecision(3).replace(/\.?0+$/,'').replace(/\.?0+e/,'e');}
function has(c, w){ return (c.s && w.b) || w.rec; }
function pic(L, c, w, which, size){
  // one tile, longer side `size` px: a window onto the channel's sprite (cell [h, w]; column =
  // rank, row 0 = rec, row 1 = img), or the tile's own file in a version-1 run
  const d = el('div','pic'); const im = new Image(); im.loading = 'lazy'; im.className = which;
  im.alt = L.label+' ch '+c.c+' rank '+(w.r+1)+' '+which;
  if(c.s && L.cell){
    const h = L.cell[0], wd = L.cell[1], s = size/Math.max(h, wd);
    d.style.width = Math.round(wd*s)+'px'; d.style.height = Math.round(h*s)+'px';
    im.src = c.s; im.style.width = (D.k*wd*s)+'px'; im.style.height = (2*h*s)+'px';
    im.style.marginLeft = (-w.r*wd*s)+'px'; im.style.marginTop = (which==='img' ? -h*s : 0)+'px';
  } else {
    d.style.width = d.style.height = size+'px'; im.classList.add('whole');
    im.src = which==='rec' ? w.rec : w.img;
  }
  d.appendChild(im); return d;
}
function tile(L, c, w, which){
  const d = el('div','t');
  if(!has(c, w)){ const e = el('div','empty'); d.appendChild(e); return d; }
  d.title = 'rank '+(w.r+1)+' | activation '+fmt(w.a)+' | '+D.images[w.i];
  d.appendChild(pic(L, c, w, which, D.tile));
  if(which==='rec') d.appendChild(el('span','',fmt(w.a)));
  d.addEventListener('click', ()=>show(L,c,w));
  return d;
}
function build(li){
  if(built[li]) return; built[li]=true;
  const L = D.layers[li];
  const sec = document.getElementById('L'+li);
  const grid = sec.querySelector('.grid');
  const cols = Math.ceil(Math.sqrt(D.k));
  const frag = document.createDocumentFragment();
  for(const c of L.units){
    const ch = el('div','ch'); ch.id = 'L'+li+'c'+c.c;
    const dead = c.w.length && c.w[0].a <= 0;  // never fired: its winners are just the first images
    ch.appendChild(el('h3', dead ? 'dead' : '', 'ch '+c.c+(dead ? ' \u00b7 inactive (max \u2264 0 on every image)' : '')));
    const pair = el('div','pair');
    for(const which of ['rec','img']){
      const g = el('div','tiles'); g.style.gridTemplateColumns='repeat('+cols+', var(--tile))';
      for(let r=0;r<D.k;r++){
        const w = c.w[r];
        if(w) g.appendChild(tile(L,c,w,which)); else { const d=el('div','t'); d.appendChild(el('div','empty')); g.appendChild(d); }
      }
      pair.appendChild(g);
    }
    ch.appendChild(pair); frag.appendChild(ch);
  }
  grid.appendChild(frag);
}
const tabs = [...document.querySelectorAll('section.layer, section.analysis')];
const tabName = i => i < D.layers.length ? D.layers[i].label : tabs[i].dataset.name;
function activate(li){
  tabs.forEach((s,i)=>s.classList.toggle('active', i===li));
  nav.querySelectorAll('button').forEach((b,i)=>b.classList.toggle('active', i===li));
  if(li < D.layers.length) build(li);
  if(location.hash !== '#'+tabName(li)) history.replaceState(null,'','#'+tabName(li));
}
tabs.forEach((s,li)=>{ const b = el('button', li < D.layers.length ? '' : 'an', tabName(li));
  b.addEventListener('click',()=>activate(li)); nav.appendChild(b); });
function show(L,c,w){
  current = {L,c,w};
  const big = box.querySelector('.big'); big.innerHTML = '';
  const side = Math.min(420, Math.round(0.42*window.innerWidth));
  big.appendChild(pic(L, c, w, 'rec', side)); big.appendChild(pic(L, c, w, 'img', side));
  box.querySelector('p').innerHTML = '';
  const p = box.querySelector('p');
  p.appendChild(document.createTextNode(L.label+'  channel '+c.c+'  rank '+(w.r+1)+' of '+D.k+'  activation '+fmt(w.a)));
  p.appendChild(el('br'));
  p.appendChild(document.createTextNode('image #'+w.i+': '+D.images[w.i]));
  p.appendChild(el('br'));
  const s = el('small','', 'unit (y, x) = ('+w.y+', '+w.x+')  RF box [y0,y1)x[x0,x1) = '+JSON.stringify(w.b)+
    '  clipped '+JSON.stringify(w.bc)+'   left: reconstruction, right: image patch   (Esc closes, arrows step)');
  p.appendChild(s);
  box.classList.add('on');
}
function step(d){
  if(!current) return; const {L,c,w} = current; const i = c.w.indexOf(w)+d;
  if(i>=0 && i<c.w.length && has(c, c.w[i])) show(L,c,c.w[i]);
}
box.addEventListener('click', ()=>{box.classList.remove('on'); current=null;});
document.addEventListener('keydown', e=>{
  if(!box.classList.contains('on')) return;
  if(e.key==='Escape'){box.classList.remove('on'); current=null;}
  if(e.key==='ArrowRight') step(1); if(e.key==='ArrowLeft') step(-1);
});
document.querySelectorAll('.goto').forEach(inp=>inp.addEventListener('change',()=>{
  const li = +inp.dataset.layer; build(li);
  const t = document.getElementById('L'+li+'c'+inp.value); if(t){ t.scrollIntoView({block:'center'}); t.style.outline='3px solid #ffb300'; }
}));
const want = decodeURIComponent(location.hash.slice(1));
const start = Math.max(0, tabs.findIndex((s,i)=>tabName(i)===want));
if(tabs.length) activate(start);
})();
"""


#: the side of a tile in the report's grids, CSS pixels
TILE_PX = 64


def _data(res: Results) -> Dict[str, Any]:
    """The compact JSON the page's script reads."""
    items = res.images.get("items", {})
    images: Dict[str, str] = {i: v.get("name", "") for i, v in items.items()}
    layers: List[Dict[str, Any]] = []
    for lr in res.layers:
        units = []
        for u in lr.units:
            ws = []
            for w in u.winners:
                d = {"r": w.rank, "i": w.image, "a": w.activation, "y": w.y, "x": w.x, "b": w.box, "bc": w.box_clipped}
                if w.tiles:  # a version-1 run: one file per tile
                    d.update(rec=w.tiles.get("rec"), img=w.tiles.get("img"))
                ws.append(d)
                images.setdefault(str(w.image), w.source)
            units.append({"c": u.channel, "s": u.sprite, "w": ws})
        layers.append({"name": lr.name, "label": lr.label, "cell": lr.cell, "units": units})
    return {"k": res.k, "tile": TILE_PX, "images": images, "layers": layers}


def _cell(v: Any) -> str:
    """A table cell: numbers with 4 significant digits (right-aligned), anything else as text."""
    if isinstance(v, float):
        return f'<td class="num">{v:.4g}</td>'
    if isinstance(v, int) and not isinstance(v, bool):
        return f'<td class="num">{v}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def analysis_sections(res: Results) -> List[str]:
    """One ``section.analysis`` per record of ``res.analyses`` (``--analyses``): its figure, key
    numbers and files, or why it was skipped."""
    e = html.escape
    out = []
    for name, rec in res.analyses.items():
        body = [f'<div class="lhead"><h2>{e(name)}</h2><span class="info">{e(rec.status)}'
                + (f" &middot; {rec.seconds:.1f} s" if rec.seconds else "") + "</span></div>"]
        if rec.status != "done":
            body.append(f"<p>Skipped: {e(rec.reason)}</p>")
        if rec.headers:
            body.append('<table class="keys"><tr>' + "".join(f"<th>{e(str(h))}</th>" for h in rec.headers) + "</tr>"
                        + "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rec.rows) + "</table>")
        body.extend(f"<p class=\"info\">{e(n)}</p>" for n in rec.notes)
        if rec.files:
            body.append('<div class="files">' + " ".join(f'<a href="{e(p)}">{e(k)}</a>' for k, p in rec.files.items())
                        + "</div>")
        for p in rec.files.values():
            if p.endswith(".png"):
                body.append(f'<p><a href="{e(p)}"><img class="fig" src="{e(p)}" alt="{e(name)} figure"></a></p>')
        out.append(f'<section class="analysis" id="A-{e(name)}" data-name="{e(name)}">' + "".join(body) + "</section>")
    return out


def render_html(res: Results) -> str:
    """The report page for ``res`` (paths relative to the run folder)."""
    e = html.escape
    cfg = res.config
    model = res.model
    k = int(cfg.get("k", 9))
    tile_px = TILE_PX
    n_img = res.images.get("count", "?")
    readable = res.images.get("readable", n_img)
    skipped = res.images.get("skipped", [])
    meta = (f"model <b>{e(str(model.get('spec')))}</b> (weights {e(str(model.get('weights')))}) &middot; "
            f"top-{k} over {readable} images of <code>{e(str(res.images.get('spec')))}</code>"
            + (f" ({len(skipped)} unreadable skipped)" if skipped else "")
            + f" &middot; rule {e(res.rule)} &middot; input {res.input_size[0]}&times;{res.input_size[1]} px"
            f" &middot; {e(res.created)}")
    sections = []
    for li, lr in enumerate(res.layers):
        name = e(lr.label) + ("" if lr.label == lr.name else f" <small>({e(lr.name)})</small>")
        rf = f"RF {lr.rf[0]}&times;{lr.rf[1]} px &middot; " if lr.rf else ""
        info = (f"{rf}map {lr.map_size[0]}&times;{lr.map_size[1]} &middot; {lr.channels} of "
                f"{lr.channels_total} channels")
        sheets = " ".join(f'<a href="{e(s)}">sheet {i + 1}</a>' for i, s in enumerate(lr.sheets))
        sections.append(
            f'<section class="layer" id="L{li}"><div class="lhead"><h2>{name}</h2>'
            f'<span class="info">{info}</span><span class="sheets">{sheets}</span></div>'
            f'<div class="toolbar">go to channel <input class="goto" type="number" min="0" data-layer="{li}"> '
            f'&middot; left: reconstructions, right: image patches; click a tile to enlarge</div>'
            f'<div class="grid"></div></section>')
    data = (json.dumps(_data(res), separators=(",", ":"), ensure_ascii=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))  # inert in <script>
    title = e(f"deconvis: {cfg.get('run', '')} top-{k}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{title}</title>'
            f'<style>:root{{--tile:{tile_px}px}}{_CSS}</style></head>\n'
            f'<body class="nojs"><header><h1>{title}</h1><div class="meta">{meta}</div></header>\n'
            f'<nav></nav><main>\n' + "\n".join(sections + analysis_sections(res)) + "\n</main>\n"
            f'<div id="box"><div class="big"></div><p></p></div>\n'
            f'<script type="application/json" id="data">{data}</script>\n<script>{_JS}</script>\n</body></html>\n')


def write_report(res: Results, run_dir: str, filename: str = "index.html") -> str:
    """Write the report atomically into ``run_dir``; returns its path."""
    path = os.path.join(run_dir, filename)
    write_text(path, render_html(res))
    return path
