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
    const h3 = el('h3', dead ? 'dead' : '');
    const name = 'ch '+c.c+(dead ? ' \u00b7 inactive (max \u2264 0 on every image)' : '');
    if(L.pages){ const a = el('a', 'unit', name); a.href = L.pages+String(c.c).padStart(4,'0')+'.html'; h3.appendChild(a); }
    else h3.textContent = name;
    ch.appendChild(h3);
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
