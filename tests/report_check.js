// Injected by tests/test_report.sh after the report's own script: checks
// the page as laid out at the window's width and leaves the verdict in
// a div with id "check" whose data-problems attribute the test reads from the DOM.
(function () {
  const problems = [];
  const want = JSON.parse(document.getElementById('expect').textContent);
  // Headless Chromium's window is at least 500 px wide, so a phone's width
  // is set on the root element: the report has no media queries and no
  // viewport units, so its layout depends only on that width.
  document.documentElement.style.width = `${want.width}px`;
  const W = document.documentElement.getBoundingClientRect().width;
  const count = (sel) => document.querySelectorAll(sel).length;
  // Everything the report must show.
  if (count('svg.chart') !== want.charts) problems.push(`${count('svg.chart')} charts, not ${want.charts}`);
  if (count('canvas') !== want.maps) problems.push(`${count('canvas')} maps, not ${want.maps}`);
  if (count('table tr') !== want.rows) problems.push(`${count('table tr')} table rows, not ${want.rows}`);
  if (count('dl.defs dt') < 8) problems.push('the head table\'s columns are not explained');
  document.querySelectorAll('canvas').forEach((cv) => {
    const px = cv.width && cv.height ? cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data : [];
    let ink = 0;
    for (let i = 0; i < px.length; i += 4) ink += px[i] < 200 ? 1 : 0;
    if (ink < 100) problems.push(`map ${cv.id} is blank`);
  });
  document.querySelectorAll('svg.chart').forEach((svg, k) => {
    if (!svg.querySelector('polyline, rect')) problems.push(`chart ${k} draws nothing`);
  });
  // Nothing wider than the window: the page never scrolls sideways.
  if (document.body.scrollWidth > W + 1)
    problems.push(`the page is ${document.body.scrollWidth} px wide in a ${W} px window`);
  document.querySelectorAll('svg, canvas, .scroll, pre, dl, p, h1, h2').forEach((el) => {
    const r = el.getBoundingClientRect();
    if (r.right > W + 1 || r.left < -1) problems.push(`${el.tagName} ${el.id || el.className} overflows (${r.left}..${r.right})`);
  });
  // Inside each chart no two labels overlap, and none sits on the plot.
  const overlap = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
  document.querySelectorAll('svg.chart').forEach((svg, k) => {
    const texts = [...svg.querySelectorAll('text')].map((t) => t.getBoundingClientRect());
    const plot = svg.querySelector('rect').getBoundingClientRect();
    texts.forEach((a, i) => {
      texts.slice(i + 1).forEach((b) => { if (overlap(a, b)) problems.push(`chart ${k}: two labels overlap`); });
      if (overlap(a, plot)) problems.push(`chart ${k}: a label lies on the plot`);
    });
  });
  const out = document.createElement('div');
  out.id = 'check';
  out.dataset.width = W;
  out.dataset.problems = problems.length ? problems.join('; ') : 'none';
  document.body.appendChild(out);
})();
