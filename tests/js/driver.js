// Drives the official Pusher clients for the Python tests: one JSON command a line on stdin,
// one JSON report a line on stdout. pusher-js connects to BunPulse; the npm `pusher` library
// signs subscriptions and calls the HTTP API, exactly as an application would.
//
// Environment: BP_HOST, BP_PORT, BP_APP_ID, BP_KEY, BP_SECRET, BP_MASTER_KEY (base64, optional),
// BP_TLS=1 for wss:// and https:// (Node trusts the test's CA through NODE_EXTRA_CA_CERTS),
// BP_PREFIX (optional: where a host application mounts BunPulse, e.g. /realtime).
'use strict';
const Pusher = require('pusher-js');
const PusherServer = require('pusher');
const readline = require('readline');

const env = process.env;
const tls = env.BP_TLS === '1';
const prefix = env.BP_PREFIX || '';
// The npm library has no path option: a mounted server's prefix rides on the host, and the
// library signs the path below it.
const api = new PusherServer({
  appId: env.BP_APP_ID, key: env.BP_KEY, secret: env.BP_SECRET, useTLS: tls,
  ...(prefix ? {host: `${env.BP_HOST}:${env.BP_PORT}${prefix}`}
    : {host: env.BP_HOST, port: String(env.BP_PORT)}),
  encryptionMasterKeyBase64: env.BP_MASTER_KEY || undefined,
});
const clients = {};

function report(msg) { process.stdout.write(JSON.stringify(msg) + '\n'); }

// `authBase` (e.g. http://127.0.0.1:8000): authorize through a host application's endpoints,
// `${authBase}/pusher/auth` and `${authBase}/pusher/user-auth`, as a browser app would
// (`headers` go with each request); otherwise the npm library signs in-process.
function connect({id, presence, user, key, authBase, headers}) {
  const viaHost = (path) => ({endpoint: authBase + path, headers: headers || {}});
  const client = new Pusher(key || env.BP_KEY, {
    cluster: 'mt1', wsHost: env.BP_HOST, wsPort: Number(env.BP_PORT),
    wssPort: Number(env.BP_PORT), forceTLS: tls, enabledTransports: ['ws'],
    disableStats: true, ...(prefix ? {wsPath: prefix} : {}),
    channelAuthorization: authBase ? viaHost('/pusher/auth') : {
      customHandler: ({socketId, channelName}, cb) => {
        try {
          cb(null, api.authorizeChannel(socketId, channelName,
            channelName.startsWith('presence-') ? presence : undefined));
        } catch (err) { cb(err, null); }
      }},
    userAuthentication: authBase ? viaHost('/pusher/user-auth') : {
      customHandler: ({socketId}, cb) => {
        try { cb(null, api.authenticateUser(socketId, user)); } catch (err) { cb(err, null); }
      }},
  });
  client.connection.bind('state_change', (s) => report({type: 'state', id, current: s.current, previous: s.previous}));
  client.connection.bind('connected', () => report({type: 'connected', id, socket_id: client.connection.socket_id}));
  client.connection.bind('error', (err) => report({type: 'error', id, error: serialize(err)}));
  // Every frame received, for what the client API does not surface (signin_success, user_id).
  client.connection.bind('message', (m) => report({type: 'message', id, event: m.event, channel: m.channel, data: serialize(m.data), user_id: m.user_id}));
  client.user.bind_global((event, data) => report({type: 'user_event', id, event, data}));
  client.user.watchlist.bind('online', (e) => report({type: 'watchlist', id, name: 'online', user_ids: e.user_ids}));
  client.user.watchlist.bind('offline', (e) => report({type: 'watchlist', id, name: 'offline', user_ids: e.user_ids}));
  clients[id] = client;
}

function serialize(err) {
  if (!err) return err;
  try { return JSON.parse(JSON.stringify(err)); } catch (e) { return String(err); }
}

function subscribe({id, channel}) {
  const ch = clients[id].subscribe(channel);
  ch.bind_global((event, data) => {
    let payload = data;
    if (event === 'pusher:subscription_succeeded' && data && data.members) {
      payload = {count: data.count, ids: Object.keys(data.members), members: data.members, me: data.me};
    }
    report({type: 'event', id, channel, event, data: serialize(payload)});
  });
}

const handlers = {
  connect,
  subscribe,
  unsubscribe: ({id, channel}) => clients[id].unsubscribe(channel),
  // pusher-js answers false when it did not send (not connected): a failure, not a result.
  trigger: ({id, channel, event, data}) => {
    if (!clients[id].channel(channel).trigger(event, data)) throw new Error('client event not sent');
    return {sent: true};
  },
  signin: ({id}) => clients[id].signin(),
  disconnect: ({id}) => clients[id].disconnect(),
  socket_id: ({id}) => clients[id].connection.socket_id,
  state: ({id}) => clients[id].connection.state,
  // what pusher-js keeps from pusher_internal:subscription_count (null before the first)
  subscription_count: ({id, channel}) => clients[id].channel(channel).subscriptionCount,
  members: ({id, channel}) => {
    const m = clients[id].channel(channel).members;
    return {count: m.count, ids: Object.keys(m.members), me: m.me};
  },
  // The npm server library, against the same server.
  api: async ({method, args}) => {
    const res = await api[method](...(args || []));
    if (res && typeof res.status === 'number') {
      const text = await res.text();
      let body = text;
      try { body = JSON.parse(text); } catch (e) { /* keep text */ }
      return {status: res.status, body};
    }
    return res;
  },
  webhook: ({headers, rawBody}) => {
    const hook = api.webhook({headers, rawBody});
    return {valid: hook.isValid(), events: hook.isValid() ? hook.getEvents() : null};
  },
  exit: () => { for (const c of Object.values(clients)) c.disconnect(); setTimeout(() => process.exit(0), 50); },
};

readline.createInterface({input: process.stdin}).on('line', async (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  try {
    const result = await handlers[cmd.op](cmd);
    report({type: 'reply', seq: cmd.seq, ok: true, result: result === undefined ? null : result});
  } catch (err) {
    const status = err && err.status;
    let body = err && err.body;
    try { body = JSON.parse(body); } catch (e) { /* keep */ }
    report({type: 'reply', seq: cmd.seq, ok: false, error: String(err && err.message || err), status, body});
  }
});
