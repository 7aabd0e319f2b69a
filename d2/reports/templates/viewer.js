(function () {
  function f32(b64) {
    var s = atob(b64), n = s.length, u = new Uint8Array(n);
    for (var i = 0; i < n; i++) u[i] = s.charCodeAt(i);
    return new Float32Array(u.buffer);
  }
  var VS = 'attribute vec3 p; attribute vec3 c; attribute float a; attribute float s;' +
    'uniform mat4 vp; uniform float focal; varying vec4 col;' +
    'void main(){ vec4 q = vp * vec4(p, 1.0); gl_Position = q;' +
    ' gl_PointSize = clamp(6.0 * s * focal / max(q.w, 1e-3), 1.0, 128.0); col = vec4(c, a); }';
  var FS = 'precision mediump float; varying vec4 col;' +
    'void main(){ vec2 d = gl_PointCoord - vec2(0.5); float r = dot(d, d) * 4.0;' +
    ' if (r > 1.0) discard; gl_FragColor = vec4(col.rgb, col.a * exp(-4.5 * r)); }';
  function shader(gl, type, src) {
    var sh = gl.createShader(type); gl.shaderSource(sh, src); gl.compileShader(sh); return sh;
  }
  function persp(fovy, aspect, n, f) {
    var t = 1 / Math.tan(fovy / 2);
    return [t / aspect, 0, 0, 0, 0, t, 0, 0, 0, 0, (f + n) / (n - f), -1, 0, 0, 2 * f * n / (n - f), 0];
  }
  function mul(a, b) {
    var o = new Array(16);
    for (var i = 0; i < 4; i++) for (var j = 0; j < 4; j++) {
      var x = 0; for (var k = 0; k < 4; k++) x += a[k * 4 + j] * b[i * 4 + k]; o[i * 4 + j] = x;
    }
    return o;
  }
  function lookAt(e) {  // camera at e looking at the origin, world z up (column-major)
    var f = [-e[0], -e[1], -e[2]], l = Math.hypot(f[0], f[1], f[2]);
    f = [f[0] / l, f[1] / l, f[2] / l];
    var u = [0, 0, 1], s = [f[1] * u[2] - f[2] * u[1], f[2] * u[0] - f[0] * u[2], f[0] * u[1] - f[1] * u[0]];
    l = Math.hypot(s[0], s[1], s[2]) || 1; s = [s[0] / l, s[1] / l, s[2] / l];
    u = [s[1] * f[2] - s[2] * f[1], s[2] * f[0] - s[0] * f[2], s[0] * f[1] - s[1] * f[0]];
    var d = function (a) { return a[0] * e[0] + a[1] * e[1] + a[2] * e[2]; };
    return [s[0], u[0], -f[0], 0, s[1], u[1], -f[1], 0, s[2], u[2], -f[2], 0, -d(s), -d(u), d(f), 1];
  }
  function setup(box) {
    var data = (window.D2_SPLATS || {})[box.getAttribute('data-object')];
    var canvas = box.querySelector('canvas'), slider = box.querySelector('.time');
    var label = box.querySelector('.tlabel'), play = box.querySelector('.play');
    var gl = data && (canvas.getContext('webgl', {alpha: false, preserveDrawingBuffer: true}) || canvas.getContext('experimental-webgl'));
    if (!gl) { box.insertAdjacentHTML('beforeend', '<p class="muted">WebGL is not available in this browser.</p>'); return; }
    var prog = gl.createProgram();
    gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER, VS));
    gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(prog); gl.useProgram(prog);
    var frames = data.frames.map(function (fr) {
      return {pos: f32(fr.pos), rgb: f32(fr.rgb), a: f32(fr.a), s: f32(fr.s)};
    });
    var bufs = {}, locs = {p: 3, c: 3, a: 1, s: 1};
    Object.keys(locs).forEach(function (k) {
      bufs[k] = gl.createBuffer(); var loc = gl.getAttribLocation(prog, k);
      gl.bindBuffer(gl.ARRAY_BUFFER, bufs[k]); gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, locs[k], gl.FLOAT, false, 0, 0);
    });
    var az = 0, el = data.elevation * Math.PI / 180, ti = 0, drag = null;
    canvas.addEventListener('mousedown', function (e) { drag = [e.clientX, e.clientY]; });
    window.addEventListener('mouseup', function () { drag = null; });
    window.addEventListener('mousemove', function (e) {
      if (!drag) return;
      az -= (e.clientX - drag[0]) * 0.01; el = Math.max(-1.4, Math.min(1.4, el + (e.clientY - drag[1]) * 0.01));
      drag = [e.clientX, e.clientY]; draw();
    });
    slider.addEventListener('input', function () { ti = +slider.value; draw(); });
    function draw() {
      var fr = frames[ti], r = data.radius;
      var eye = [r * Math.cos(el) * Math.cos(az), r * Math.cos(el) * Math.sin(az), r * Math.sin(el)];
      var fov = data.fov * Math.PI / 180;
      gl.uniformMatrix4fv(gl.getUniformLocation(prog, 'vp'), false,
        new Float32Array(mul(persp(fov, 1, 0.05, 50), lookAt(eye))));
      gl.uniform1f(gl.getUniformLocation(prog, 'focal'), canvas.height / (2 * Math.tan(fov / 2)));
      [['p', fr.pos], ['c', fr.rgb], ['a', fr.a], ['s', fr.s]].forEach(function (kv) {
        gl.bindBuffer(gl.ARRAY_BUFFER, bufs[kv[0]]); gl.bufferData(gl.ARRAY_BUFFER, kv[1], gl.DYNAMIC_DRAW);
      });
      gl.viewport(0, 0, canvas.width, canvas.height);
      gl.clearColor(1, 1, 1, 1); gl.clear(gl.COLOR_BUFFER_BIT);
      gl.enable(gl.BLEND); gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
      gl.drawArrays(gl.POINTS, 0, data.n);
      label.textContent = 't = ' + data.times[ti].toFixed(2) + ' (' + (ti + 1) + '/' + data.times.length + ')';
    }
    setInterval(function () {
      if (play.checked && !drag) { ti = (ti + 1) % frames.length; slider.value = ti; draw(); }
    }, 250);
    draw();
  }
  document.querySelectorAll('.viewer').forEach(setup);
})();
