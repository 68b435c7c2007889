// Azure IoT Node device SDK against dps-server's fault injection: for every kind of fault (429 with a
// Retry-After, 5xx, added latency, a stuck `assigning`, a dropped connection), over HTTPS, MQTT and MQTT over
// WebSocket, the unmodified SDK retries and ends assigned. Rules are added and removed at run time through the
// admin API (`/admin/faults`, signed like the service API).
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.26')) return;

const assert = require('node:assert/strict');
const { test } = require('node:test');
const sdk = require('../lib/sdk');
const { uniqueId, randomKey, deriveDeviceKey } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);
const groupKey = randomKey();

// What the SDK retries by itself, per transport. Over MQTT it retries 429 and 5xx answers after their
// Retry-After; its HTTP transport does not: a PUT answered 429 or 5xx (or a connection closed unanswered)
// rejects `register()` with the translated error (ThrottlingError, ServiceUnavailableError, ECONNRESET), so
// an application retries the registration itself, which is tested below. A dropped MQTT connection makes the
// SDK's own error handler throw (azure-iot-provisioning-device-mqtt 1.x calls `disconnect` without its
// callback), so that combination is left to the Python suite, whose SDK reconnects.
const RECOVERED = {
  throttle: { kind: 'throttle', retry_after_secs: 1, times: 2 },
  error: { kind: 'error', code: 503000, times: 2 },
  'poll-error': { kind: 'error', code: 500000, requests: 'poll', times: 1 },
  latency: { kind: 'latency', latency_ms: 1000 },
  stuck: { kind: 'stuck_assigning', duration_secs: 4 },
};
const HTTP_RECOVERED = ['latency', 'stuck'];
const HTTP_SURFACED = {
  throttle: [{ kind: 'throttle', retry_after_secs: 1, times: 1 }, (e) => e.name === 'ThrottlingError' && /429001/.test(e.message)],
  error: [{ kind: 'error', code: 503000, times: 1 }, (e) => e.name === 'ServiceUnavailableError' && /503000/.test(e.message)],
  drop: [{ kind: 'drop_connection', requests: 'register', times: 1 }, (e) => e.code === 'ECONNRESET'],
};

const faults = (method, path, body) => sdk.serviceCall(dps.connectionString, method, path, body);

test('setup: one symmetric-key group for every device', async () => {
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: uniqueId('node-faults'),
    attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
  });
});

// Adds `rule` for devices named `prefix*`, runs `body(registrationId)`, removes the rule; returns how often it fired.
async function withFault(prefix, rule, body) {
  const id = uniqueId('rule');
  const { responseBody: added } = await faults('POST', '/admin/faults', { ...rule, id, registration_id: `${prefix}*` });
  assert.equal(added.id, id);
  try {
    await body(`${prefix}-dev`);
    const { responseBody: listed } = await faults('GET', '/admin/faults');
    return listed.find((r) => r.id === id).fired;
  } finally {
    await faults('DELETE', `/admin/faults/${id}`);
  }
}

const provision = async (registrationId, transport) => {
  const result = await sdk.register(dps.ip, registrationId, deriveDeviceKey(groupKey, registrationId), transport);
  await sdk.assertAssigned(service, result, registrationId);
};

for (const transport of Object.keys(sdk.TRANSPORTS)) {
  for (const [name, rule] of Object.entries(RECOVERED)) {
    if (transport === 'http' && !HTTP_RECOVERED.includes(name)) continue;
    test(`${transport}: the SDK gets through an injected ${name} by itself`, async () => {
      const fired = await withFault(uniqueId(`node-${transport}-${name}`), rule, (id) => provision(id, transport));
      if (rule.times) assert.equal(fired, rule.times);
      else assert.ok(fired >= 1, `fired ${fired} times`);
    });
  }
}

for (const [name, [rule, expected]] of Object.entries(HTTP_SURFACED)) {
  test(`http: an injected ${name} rejects register() with its error, and registering again gets through`, async () => {
    const fired = await withFault(uniqueId(`node-http-${name}`), rule, async (id) => {
      await assert.rejects(provision(id, 'http'), (e) => {
        assert.ok(expected(e), `${e.name} ${e.code}: ${e.message}`);
        return true;
      });
      await provision(id, 'http');
    });
    assert.equal(fired, 1);
  });
}
