// Azure IoT Node device SDK (azure-iot-provisioning-device + -http / -mqtt transports +
// azure-iot-security-symmetric-key) against dps-server: symmetric-key individual and group enrollments over
// HTTPS (port 443), MQTT (8883) and MQTT over WebSocket (443, /$iothub/websocket). Spec sections 1, 2, 4.
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.20')) return;

const assert = require('node:assert/strict');
const { test } = require('node:test');
const sdk = require('../lib/sdk');
const { HUB_A, uniqueId, randomKey, deriveDeviceKey } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);

for (const transport of Object.keys(sdk.TRANSPORTS)) {
  test(`${transport}: individual enrollment`, async () => {
    const registrationId = uniqueId(`node-${transport}-ind`);
    const primaryKey = randomKey();
    const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: sdk.symmetricKeyAttestation(primaryKey, randomKey()),
    });
    assert.equal(created.registrationId, registrationId);

    const result = await sdk.register(dps.ip, registrationId, primaryKey, transport);

    await sdk.assertAssigned(service, result, registrationId);
  });

  test(`${transport}: individual enrollment with generated keys, deviceId and static hub`, async () => {
    const registrationId = uniqueId(`node-${transport}-gen`);
    const deviceId = `Dev.${registrationId.toUpperCase()}`;
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      deviceId,
      attestation: { type: 'symmetricKey' },
      allocationPolicy: 'static',
      iotHubs: [HUB_A],
    });
    const { responseBody: mechanism } = await service.getIndividualEnrollmentAttestationMechanism(registrationId);
    const { primaryKey, secondaryKey } = mechanism.symmetricKey;
    assert.equal(Buffer.from(primaryKey, 'base64').length, 64, 'generated keys are 64 bytes');
    assert.notEqual(primaryKey, secondaryKey);

    const result = await sdk.register(dps.ip, registrationId, secondaryKey, transport);

    await sdk.assertAssigned(service, result, registrationId, { deviceId, hubs: [HUB_A] });
  });

  test(`${transport}: enrollment group, primary and secondary derived keys`, async () => {
    const enrollmentGroupId = uniqueId(`node-${transport}-group`);
    const groupPrimary = randomKey();
    const groupSecondary = randomKey();
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation: sdk.symmetricKeyAttestation(groupPrimary, groupSecondary),
    });
    const device1 = uniqueId(`node-${transport}-gdev`);
    const device2 = uniqueId(`node-${transport}-gdev`);

    const result1 = await sdk.register(dps.ip, device1, deriveDeviceKey(groupPrimary, device1), transport);
    const result2 = await sdk.register(dps.ip, device2, deriveDeviceKey(groupSecondary, device2), transport);

    await sdk.assertAssigned(service, result1, device1);
    await sdk.assertAssigned(service, result2, device2);
    const { items, pages } = await sdk.drainQuery(
      service.createEnrollmentGroupDeviceRegistrationStateQuery({ query: 'SELECT * FROM enrollmentGroups' },
        enrollmentGroupId, 1));
    assert.deepEqual(items.map((s) => s.registrationId).sort(), [device1, device2].sort());
    assert.ok(pages.every((p) => p.itemType === 'deviceRegistration' && p.count <= 1), JSON.stringify(pages));
  });

  test(`${transport}: registration ID with mixed case and . _ : characters`, async () => {
    // Spec 11.1: case-insensitive, alphanumerics plus `. _ : -`; the group key is derived over the exact string
    // the device uses and the device ID keeps its case (11.2). The Node SDK signs an unencoded `sr`.
    const enrollmentGroupId = uniqueId(`node-${transport}-chars`);
    const groupKey = randomKey();
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
    });
    const registrationId = uniqueId(`Node.Mixed_Case:${transport}`);

    const result = await sdk.register(dps.ip, registrationId, deriveDeviceKey(groupKey, registrationId), transport);

    await sdk.assertAssigned(service, result, registrationId);
  });

  test(`${transport}: custom payload is accepted and not echoed without custom allocation`, async () => {
    // Azure returns registrationState.payload only when a custom allocation webhook supplied one (spec 1.6,
    // 8.4); without custom allocation the device's payload is accepted and nothing comes back.
    const enrollmentGroupId = uniqueId(`node-${transport}-payload`);
    const groupKey = randomKey();
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
    });
    const registrationId = uniqueId(`node-${transport}-pdev`);
    const payload = { modelId: 'dtmi:example:thermostat;1', location: { building: 43, floor: 2 }, tags: ['a', 'b'] };

    const result = await sdk.register(dps.ip, registrationId, deriveDeviceKey(groupKey, registrationId), transport,
      payload);

    const state = await sdk.assertAssigned(service, result, registrationId);
    assert.equal(result.payload, undefined, JSON.stringify(result));
    assert.equal(state.payload, undefined, JSON.stringify(state));
  });

  test(`${transport}: a wrong device key is refused and leaves no registration`, async () => {
    const registrationId = uniqueId(`node-${transport}-bad`);
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
    });

    await assert.rejects(sdk.register(dps.ip, registrationId, randomKey(), transport));

    await sdk.rejectsWithStatus(service.getDeviceRegistrationState(registrationId), 404, 404203);
  });
}

test('http: a wrong device key gets 401 with error code 401000', async () => {
  const registrationId = uniqueId('node-http-401');
  await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
  });

  await sdk.rejectsWithStatus(sdk.register(dps.ip, registrationId, randomKey(), 'http'), 401, 401000);
});

test('http: an unknown registration ID gets 401', async () => {
  await sdk.rejectsWithStatus(sdk.register(dps.ip, uniqueId('node-nobody'), randomKey(), 'http'), 401, 401000);
});

test('http: a disabled enrollment is not assigned', async () => {
  // Azure reports status `disabled` (spec 1.8, 9.5); the Node SDK's polling state machine turns any status
  // but assigned/assigning/failed into an error.
  const registrationId = uniqueId('node-off');
  const key = randomKey();
  await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(key, randomKey()),
    provisioningStatus: 'disabled',
  });

  await assert.rejects(sdk.register(dps.ip, registrationId, key, 'http'));
});

test('http: a disabled enrollment group is not assigned', async () => {
  const enrollmentGroupId = uniqueId('node-goff');
  const groupKey = randomKey();
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
    provisioningStatus: 'disabled',
  });
  const registrationId = uniqueId('node-goff-dev');

  await assert.rejects(sdk.register(dps.ip, registrationId, deriveDeviceKey(groupKey, registrationId), 'http'));
});

test('http: key rotation: the old key is refused, the new one keeps the device on its hub', async () => {
  const registrationId = uniqueId('node-rotate');
  const oldKey = randomKey();
  const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(oldKey, randomKey()),
  });
  const first = await sdk.register(dps.ip, registrationId, oldKey, 'http');
  await sdk.assertAssigned(service, first, registrationId);

  const newKey = randomKey();
  await service.createOrUpdateIndividualEnrollment({
    ...created,
    attestation: sdk.symmetricKeyAttestation(newKey, randomKey()),
  });

  await sdk.rejectsWithStatus(sdk.register(dps.ip, registrationId, oldKey, 'http'), 401, 401000);
  const second = await sdk.register(dps.ip, registrationId, newKey, 'http');
  await sdk.assertAssigned(service, second, registrationId, { hubs: [first.assignedHub] });
});

test('http: a deleted enrollment no longer provisions', async () => {
  const registrationId = uniqueId('node-gone');
  const key = randomKey();
  await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(key, randomKey()),
  });
  await sdk.assertAssigned(service, await sdk.register(dps.ip, registrationId, key, 'http'), registrationId);

  await service.deleteIndividualEnrollment(registrationId);

  await sdk.rejectsWithStatus(sdk.register(dps.ip, registrationId, key, 'http'), 401, 401000);
});

test('30 devices of one group at once over all transports; hashed allocation uses both hubs', async () => {
  const enrollmentGroupId = 'node-crowd';
  const groupKey = randomKey();
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
    allocationPolicy: 'hashed',
  });
  // Fixed IDs (the server is fresh): hashed allocation is deterministic per registration ID, so the check
  // that both hubs get devices cannot flake.
  const ids = Array.from({ length: 30 }, (_, i) => `node-crowd-${String(i).padStart(2, '0')}`);
  const transports = Object.keys(sdk.TRANSPORTS);

  const results = await Promise.all(ids.map((id, i) =>
    sdk.register(dps.ip, id, deriveDeviceKey(groupKey, id), transports[i % transports.length])));

  for (let i = 0; i < ids.length; i++) await sdk.assertAssigned(service, results[i], ids[i]);
  const hubs = new Set(results.map((r) => r.assignedHub));
  assert.equal(hubs.size, 2, `30 devices hashed onto ${[...hubs]}`);
  const { items } = await sdk.drainQuery(service.createEnrollmentGroupDeviceRegistrationStateQuery(
    { query: 'SELECT * FROM enrollmentGroups' }, enrollmentGroupId, 7));
  assert.deepEqual(items.map((s) => s.registrationId).sort(), ids);
});
