// Drive a running qwen-serve daemon with the official `@qwen-code/sdk` DaemonClient (pinned in package.json).
//
//   QWEN_SERVER_TOKEN=<token> node sdk_interop.mjs <daemon-url> <scenario>
//
// Scenarios: capabilities | login | cancel | errors | deny | stream. Each step prints one JSON line on stdout:
//   {"step": <name>, "ok": true, "value": <what the SDK returned>}
//   {"step": <name>, "ok": false, "error": {"name", "isDaemonHttpError", "status", "body", "message"}}
// The script asserts nothing: test_sdk_interop.py reads these lines and holds the assertions. It exits 1 on an
// unexpected failure (a step that must succeed threw, or an error that is not a DaemonHttpError), with the
// stack on stderr. The token travels in the environment, never on the command line.
//
// `stream` reads a JSON array on stdin: the frames a client read from the daemon's event stream
// (WS /workspace/auth/events, recorded by the test: the SDK has no client for it), and runs the SDK's
// validators, its auth and session reducers, its UI normalizer and its transcript reducer over them.

import {
  DaemonClient,
  DaemonHttpError,
  asKnownDaemonEvent,
  createDaemonAuthState,
  createDaemonTranscriptState,
  isDaemonEventType,
  isKnownDaemonEvent,
  normalizeDaemonEvent,
  reduceDaemonAuthEvent,
  reduceDaemonAuthEvents,
  reduceDaemonSessionEvents,
  reduceDaemonTranscriptEvents,
  requireWorkspaceCwd,
  selectUnrecognizedDiagnostics,
} from '@qwen-code/sdk/daemon';

const FETCH_TIMEOUT_MS = 10_000;
const AWAIT_TIMEOUT_MS = 30_000;

function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

/** A function-free snapshot of an SDK value (the auth handle carries methods). */
function plain(value) {
  return value === undefined ? null : JSON.parse(JSON.stringify(value));
}

/** A step that must succeed: its value is printed, any failure is unexpected. */
async function step(name, fn) {
  const value = await fn();
  emit({ step: name, ok: true, value: plain(value) });
  return value;
}

/** A step that should reject with a DaemonHttpError: the error is printed (a success is printed too, for the
 *  test to refuse); any other kind of error is unexpected. */
async function expectHttpError(name, fn) {
  try {
    const value = await fn();
    emit({ step: name, ok: true, value: plain(value) });
  } catch (error) {
    if (!(error instanceof DaemonHttpError)) throw error;
    emit({
      step: name,
      ok: false,
      error: {
        name: error.name,
        isDaemonHttpError: true,
        status: error.status,
        body: plain(error.body),
        message: error.message,
      },
    });
  }
}

function client(baseUrl, token) {
  return new DaemonClient({ baseUrl, token, fetchTimeoutMs: FETCH_TIMEOUT_MS });
}

/** Start a qwen-oauth login through the high-level helper and wait for its terminal state. */
async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

/** What the SDK makes of each frame, one by one and as a whole stream. */
async function consumeStream(frames) {
  await step('validators', () =>
    frames.map((frame) => ({
      type: frame.type,
      isKnownDaemonEvent: isKnownDaemonEvent(frame),
      asKnownDaemonEvent: asKnownDaemonEvent(frame) !== undefined,
      isDaemonEventType: isDaemonEventType(frame, frame.type),
    })),
  );
  // Frame by frame: whether each one changed the auth state (the reducer returns the same object otherwise).
  await step('reduceDaemonAuthEvent', () => {
    let state = createDaemonAuthState();
    return frames.map((frame) => {
      const next = reduceDaemonAuthEvent(state, frame);
      const changed = next !== state;
      state = next;
      return { type: frame.type, changed };
    });
  });
  await step('reduceDaemonAuthEvents', () => reduceDaemonAuthEvents(frames));
  await step('reduceDaemonAuthEvents, device-flow events only', () =>
    reduceDaemonAuthEvents(frames.filter((frame) => frame.type.startsWith('auth_device_flow_'))),
  );
  await step('reduceDaemonSessionEvents', () => reduceDaemonSessionEvents(frames));
  const uiEvents = await step('normalizeDaemonEvent', () => frames.map((frame) => normalizeDaemonEvent(frame)));
  await step('selectUnrecognizedDiagnostics', () =>
    selectUnrecognizedDiagnostics(reduceDaemonTranscriptEvents(createDaemonTranscriptState(), uiEvents.flat())),
  );
}

async function loginUntilSettled(daemon) {
  const handle = await step('auth.start', () => daemon.auth.start({ providerId: 'qwen-oauth' }));
  const throttled = [];
  await step('awaitCompletion', () =>
    handle.awaitCompletion({ timeoutMs: AWAIT_TIMEOUT_MS, onThrottled: (ms) => throttled.push(ms) }),
  );
  emit({ step: 'onThrottled', ok: true, value: throttled });
  await step('getDeviceFlow', () => daemon.getDeviceFlow(handle.deviceFlowId));
  await step('getAuthStatus', () => daemon.getAuthStatus());
}

const SCENARIOS = {
  async capabilities({ daemon }) {
    await step('health', () => daemon.health());
    const caps = await step('capabilities', () => daemon.capabilities());
    await step('requireWorkspaceCwd', () => requireWorkspaceCwd(caps));
    await step('getAuthStatus', () => daemon.getAuthStatus());
  },

  async login({ daemon }) {
    await loginUntilSettled(daemon);
  },

  async deny({ daemon }) {
    await loginUntilSettled(daemon);
  },

  async stream({ daemon }) {
    const frames = JSON.parse(await readStdin());
    await consumeStream(frames);
    await step('capabilities', () => daemon.capabilities());
    await step('getAuthStatus', () => daemon.getAuthStatus());
  },

  async cancel({ daemon }) {
    const handle = await step('auth.start as cli-A', () =>
      daemon.auth.start({ providerId: 'qwen-oauth', clientId: 'cli-A' }),
    );
    const id = handle.deviceFlowId;
    await step('startDeviceFlow as cli-B (take-over)', () =>
      daemon.startDeviceFlow({ providerId: 'qwen-oauth', clientId: 'cli-B' }),
    );
    await step('getDeviceFlow as cli-B', () => daemon.getDeviceFlow(id, { clientId: 'cli-B' }));
    await step('getDeviceFlow as cli-A', () => daemon.getDeviceFlow(id, { clientId: 'cli-A' }));
    await step('cancelDeviceFlow as cli-B', () => daemon.cancelDeviceFlow(id, { clientId: 'cli-B' }));
    await step('getDeviceFlow as cli-A after cancel', () => daemon.getDeviceFlow(id, { clientId: 'cli-A' }));
    await step('awaitCompletion as cli-A after cancel', () => handle.awaitCompletion({ timeoutMs: AWAIT_TIMEOUT_MS }));
    await step('handle.cancel again (idempotent)', () => handle.cancel());
    await step('getAuthStatus', () => daemon.getAuthStatus());
  },

  async errors({ daemon, baseUrl }) {
    await expectHttpError('startDeviceFlow github', () => daemon.startDeviceFlow({ providerId: 'github' }));
    await expectHttpError('auth.start github', () => daemon.auth.start({ providerId: 'github' }));
    await expectHttpError('startDeviceFlow bad client id', () =>
      daemon.startDeviceFlow({ providerId: 'qwen-oauth', clientId: 'bad id with spaces' }),
    );
    await expectHttpError('getDeviceFlow unknown', () => daemon.getDeviceFlow('unknown'));
    // The SDK treats DELETE's 404 as success (cancel is idempotent).
    await step('cancelDeviceFlow unknown', () => daemon.cancelDeviceFlow('unknown'));
    const intruder = client(baseUrl, 'wrong-token');
    await step('health with wrong token', () => intruder.health());
    await expectHttpError('capabilities with wrong token', () => intruder.capabilities());
    await expectHttpError('getAuthStatus with wrong token', () => intruder.getAuthStatus());
    await expectHttpError('startDeviceFlow with wrong token', () =>
      intruder.startDeviceFlow({ providerId: 'qwen-oauth' }),
    );
    await step('getAuthStatus', () => daemon.getAuthStatus());
  },
};

async function main() {
  const [baseUrl, scenario] = process.argv.slice(2);
  const token = process.env.QWEN_SERVER_TOKEN;
  const run = SCENARIOS[scenario];
  if (!baseUrl || !run || !token) {
    process.stderr.write(
      `usage: QWEN_SERVER_TOKEN=<token> node sdk_interop.mjs <daemon-url> <${Object.keys(SCENARIOS).join('|')}>\n`,
    );
    process.exit(2);
  }
  await run({ daemon: client(baseUrl, token), baseUrl });
}

main().catch((error) => {
  process.stderr.write(`sdk_interop: unexpected error: ${error?.stack ?? error}\n`);
  if (error instanceof DaemonHttpError) {
    process.stderr.write(`status ${error.status}, body ${JSON.stringify(error.body)}\n`);
  }
  process.exitCode = 1;
});
