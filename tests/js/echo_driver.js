// Drives Laravel Echo (laravel-echo, with pusher-js) for tests/test_laravel_echo.py, in the line
// protocol of driver.js: one JSON command a line on stdin, one JSON report a line on stdout.
//
// Each Echo is made by running a Laravel app's resources/js/echo.js, as docs/laravel.md shows
// it, the way Vite builds it: `import.meta.env.VITE_*` replaced by the .env's values and the
// imports bound to the installed packages. Two things a browser page gives and Node lacks are
// stood in for: relative URLs (Echo's default authEndpoint '/broadcasting/auth') resolve
// against the page's origin, and the page's CSRF token is `window.Laravel.csrfToken`, which
// Echo sends as X-CSRF-TOKEN (the test's Laravel stand-in knows the session by it).
'use strict';
const fs = require('fs');
const path = require('path');
const readline = require('readline');
const {pathToFileURL} = require('url');
const PusherJs = require('pusher-js');

// laravel-echo as `import Echo from 'laravel-echo'` binds it: its ES module build (its CommonJS
// one does not load under Node's require). A fresh copy for every page, as every browser page
// loads its own: Echo keeps its default auth headers (where the CSRF token goes) in one object
// shared by every Echo of a copy.
const echoDir = path.dirname(path.dirname(require.resolve('laravel-echo')));
const echoEntry = path.join(echoDir, JSON.parse(
  fs.readFileSync(path.join(echoDir, 'package.json'), 'utf8')).exports['.'].import);
const loadEcho = (page) => import(`${pathToFileURL(echoEntry).href}?page=${encodeURIComponent(page)}`)
  .then((m) => m.default);

globalThis.window = {};  // Echo finds pusher-js as window.Pusher, as in a browser
const echoes = {};

function report(msg) { process.stdout.write(JSON.stringify(msg) + '\n'); }

// pusher-js, as loaded by a page at `origin`: relative endpoints resolve against it.
function pageOf(origin) {
  const resolve = (path) => new URL(path, origin).href;
  return class PagePusher extends PusherJs {
    constructor(key, options) {
      super(key, {
        ...options,
        authEndpoint: options.authEndpoint && resolve(options.authEndpoint),
        userAuthentication: options.userAuthentication && {
          ...options.userAuthentication, endpoint: resolve(options.userAuthentication.endpoint)},
      });
    }
  };
}

// Run echo.js as Vite would ship it; return the Echo it made (window.Echo).
function runEchoJs(source, viteEnv, origin, Echo) {
  const modules = {'laravel-echo': Echo, 'pusher-js': pageOf(origin)};
  const body = source
    .replace(/^import\s+(\w+)\s+from\s+['"]([^'"]+)['"];?[ \t]*$/gm, (line, name, spec) => {
      if (!(spec in modules)) throw new Error(`echo.js imports ${spec}: not a Laravel Echo dependency`);
      return `const ${name} = __modules[${JSON.stringify(spec)}];`;
    })
    .replace(/import\.meta\.env/g, '__viteEnv');
  if (/^\s*import\b/m.test(body)) throw new Error('echo.js has an import this driver cannot bind');
  new Function('window', '__modules', '__viteEnv', body)(globalThis.window, modules, viteEnv);
  return globalThis.window.Echo;
}

async function start({id, echoJs, viteEnv, origin, csrfToken}) {
  const Echo = await loadEcho(id);
  globalThis.window.Laravel = csrfToken ? {csrfToken} : undefined;  // read by new Echo()
  delete globalThis.window.Echo;
  const echo = runEchoJs(echoJs, viteEnv, origin, Echo);
  if (!echo) throw new Error('echo.js did not set window.Echo');
  const connection = echo.connector.pusher.connection;
  connection.bind('connected', () => report({type: 'connected', id, socket_id: echo.socketId()}));
  connection.bind('error', (err) => report({type: 'error', id, error: serialize(err)}));
  connection.bind('message', (m) => report({type: 'message', id, event: m.event, channel: m.channel, data: serialize(m.data)}));
  echoes[id] = echo;
}

function serialize(value) {
  if (value === undefined) return null;
  try { return JSON.parse(JSON.stringify(value)); } catch (e) { return String(value); }
}

// Echo's channel objects: kind is the Echo method, 'channel', 'private' or 'join'; Echo keeps
// one object per channel, so every command about it reaches the same one.
function channelOf(id, kind, name) {
  if (!['channel', 'private', 'join'].includes(kind)) throw new Error(`unknown channel kind ${kind}`);
  return echoes[id][kind](name);
}

const handlers = {
  start,
  // Subscribe (Echo subscribes on first use) and report how it went; a presence channel
  // reports its here/joining/leaving callbacks too.
  subscribe: ({id, kind, name}) => {
    const channel = channelOf(id, kind, name);
    channel.subscribed(() => report({type: 'subscribed', id, name}));
    if (channel.subscription.subscribed) report({type: 'subscribed', id, name});  // already
    channel.error((err) => report({type: 'subscription_error', id, name, error: serialize(err)}));
    if (kind === 'join') {
      channel.here((users) => report({type: 'here', id, name, users}));
      channel.joining((user) => report({type: 'joining', id, name, user}));
      channel.leaving((user) => report({type: 'leaving', id, name, user}));
    }
  },
  listen: ({id, kind, name, event}) => {
    channelOf(id, kind, name).listen(event, (data) => report({type: 'listened', id, name, event, data}));
  },
  listenForWhisper: ({id, kind, name, event}) => {
    channelOf(id, kind, name).listenForWhisper(event, (data) => report({type: 'whisper', id, name, event, data}));
  },
  whisper: ({id, kind, name, event, data}) => { channelOf(id, kind, name).whisper(event, data); },
  leave: ({id, name}) => echoes[id].leave(name),
  signin: ({id}) => echoes[id].connector.signin(),
  socket_id: ({id}) => echoes[id].socketId(),
  disconnect: ({id}) => echoes[id].disconnect(),
  exit: () => { for (const e of Object.values(echoes)) e.disconnect(); setTimeout(() => process.exit(0), 50); },
};

readline.createInterface({input: process.stdin}).on('line', async (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  try {
    const result = await handlers[cmd.op](cmd);
    report({type: 'reply', seq: cmd.seq, ok: true, result: result === undefined ? null : result});
  } catch (err) {
    report({type: 'reply', seq: cmd.seq, ok: false, error: String(err && err.stack || err)});
  }
});
