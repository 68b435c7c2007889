// Azure IoT Node provisioning service SDK (azure-iot-provisioning-service, ProvisioningServiceClient
// .fromConnectionString) against dps-server's service API (spec section 5): individual enrollments and
// enrollment groups (create, get, ETag-guarded update and delete, query with paging, bulk, attestation
// mechanism), registration states (get, query, delete), and authentication with the shared access policy.
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.21')) return;

const assert = require('node:assert/strict');
const { test } = require('node:test');
const sdk = require('../lib/sdk');
const { HUB_A, HUB_B, uniqueId, randomKey, deriveDeviceKey } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);

test('the connection string names this server and the owner policy', () => {
  assert.match(dps.connectionString, new RegExp(`^HostName=${dps.ip.replace(/\./g, '\\.')};`));
  assert.match(dps.connectionString, /;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=[A-Za-z0-9+/=]+$/);
});

test('individual enrollment: create, get, update with ETag, delete', async () => {
  const registrationId = uniqueId('node-svc-ind');
  const primaryKey = randomKey();
  const secondaryKey = randomKey();

  const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(primaryKey, secondaryKey),
    initialTwin: { tags: { floor: 3 }, properties: { desired: { telemetryInterval: 30 } } },
    capabilities: { iotEdge: false },
  });
  assert.equal(created.registrationId, registrationId);
  assert.equal(created.provisioningStatus, 'enabled');
  assert.ok(created.etag, 'created enrollment has an etag');
  assert.ok(created.createdDateTimeUtc && created.lastUpdatedDateTimeUtc);

  const { responseBody: fetched } = await service.getIndividualEnrollment(registrationId);
  assert.equal(fetched.registrationId, registrationId);
  assert.equal(fetched.etag, created.etag);
  assert.equal(fetched.attestation.type, 'symmetricKey');
  assert.ok(!(fetched.attestation.symmetricKey && fetched.attestation.symmetricKey.primaryKey), 'GET hides keys');
  assert.deepEqual(fetched.initialTwin.tags, { floor: 3 });
  const { responseBody: mechanism } = await service.getIndividualEnrollmentAttestationMechanism(registrationId);
  assert.equal(mechanism.symmetricKey.primaryKey, primaryKey);
  assert.equal(mechanism.symmetricKey.secondaryKey, secondaryKey);

  // Update with the current ETag (the SDK sends it as If-Match).
  const update = {
    ...fetched,
    attestation: sdk.symmetricKeyAttestation(primaryKey, secondaryKey),
    provisioningStatus: 'disabled',
    allocationPolicy: 'static',
    iotHubs: [HUB_B],
  };
  const { responseBody: updated } = await service.createOrUpdateIndividualEnrollment(update);
  assert.equal(updated.provisioningStatus, 'disabled');
  assert.deepEqual(updated.iotHubs, [HUB_B]);
  assert.notEqual(updated.etag, created.etag);
  assert.equal(updated.createdDateTimeUtc, created.createdDateTimeUtc);

  // A stale ETag is refused (412) and changes nothing.
  await sdk.rejectsWithStatus(
    service.createOrUpdateIndividualEnrollment({ ...update, provisioningStatus: 'enabled', etag: created.etag }),
    412, 412001);
  await sdk.rejectsWithStatus(service.deleteIndividualEnrollment(registrationId, created.etag), 412, 412001);
  const { responseBody: after } = await service.getIndividualEnrollment(registrationId);
  assert.equal(after.provisioningStatus, 'disabled');
  assert.equal(after.etag, updated.etag);

  // Delete with the current ETag, then it is gone.
  await service.deleteIndividualEnrollment(registrationId, updated.etag);
  await sdk.rejectsWithStatus(service.getIndividualEnrollment(registrationId), 404, 404201);
  await sdk.rejectsWithStatus(service.deleteIndividualEnrollment(registrationId), 404, 404201);
});

test('individual enrollment: keys generated when absent; delete by object', async () => {
  const registrationId = uniqueId('node-svc-gen');
  const { responseBody: created } = await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: { type: 'symmetricKey' },
  });
  const { responseBody: mechanism } = await service.getIndividualEnrollmentAttestationMechanism(registrationId);
  assert.equal(mechanism.type, 'symmetricKey');
  for (const key of [mechanism.symmetricKey.primaryKey, mechanism.symmetricKey.secondaryKey]) {
    assert.equal(Buffer.from(key, 'base64').length, 64);
  }
  // deleteIndividualEnrollment(enrollment) sends the enrollment's etag as If-Match.
  await service.deleteIndividualEnrollment(created);
  await sdk.rejectsWithStatus(service.getIndividualEnrollment(registrationId), 404, 404201);
});

test('enrollment group: create, get, update with ETag, delete', async () => {
  const enrollmentGroupId = uniqueId('node-svc-group');
  const primaryKey = randomKey();
  const secondaryKey = randomKey();

  const { responseBody: created } = await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: sdk.symmetricKeyAttestation(primaryKey, secondaryKey),
    reprovisionPolicy: { updateHubAssignment: true, migrateDeviceData: false },
  });
  assert.equal(created.enrollmentGroupId, enrollmentGroupId);
  assert.ok(created.etag);
  assert.deepEqual(created.reprovisionPolicy, { updateHubAssignment: true, migrateDeviceData: false });

  const { responseBody: fetched } = await service.getEnrollmentGroup(enrollmentGroupId);
  assert.equal(fetched.etag, created.etag);
  assert.ok(!(fetched.attestation.symmetricKey && fetched.attestation.symmetricKey.primaryKey), 'GET hides keys');
  const { responseBody: mechanism } = await service.getEnrollmentGroupAttestationMechanism(enrollmentGroupId);
  assert.equal(mechanism.symmetricKey.primaryKey, primaryKey);
  assert.equal(mechanism.symmetricKey.secondaryKey, secondaryKey);

  const update = {
    ...fetched,
    attestation: sdk.symmetricKeyAttestation(primaryKey, secondaryKey),
    allocationPolicy: 'static',
    iotHubs: [HUB_A],
  };
  const { responseBody: updated } = await service.createOrUpdateEnrollmentGroup(update);
  assert.deepEqual(updated.iotHubs, [HUB_A]);
  assert.notEqual(updated.etag, created.etag);

  await sdk.rejectsWithStatus(service.createOrUpdateEnrollmentGroup({ ...update, etag: created.etag }), 412, 412001);
  await sdk.rejectsWithStatus(service.deleteEnrollmentGroup(enrollmentGroupId, created.etag), 412, 412001);

  await service.deleteEnrollmentGroup(enrollmentGroupId, updated.etag);
  await sdk.rejectsWithStatus(service.getEnrollmentGroup(enrollmentGroupId), 404, 404202);
});

test('individual enrollments: query with paging', async () => {
  const prefix = uniqueId('node-svc-q');
  const ids = [];
  for (let i = 0; i < 7; i++) {
    ids.push(`${prefix}-${i}`);
    await service.createOrUpdateIndividualEnrollment({
      registrationId: ids[i],
      attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
    });
  }

  const { items, pages } = await sdk.drainQuery(
    service.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 3));

  const seen = items.map((e) => e.registrationId);
  assert.equal(new Set(seen).size, seen.length, `duplicates across pages: ${seen}`);
  for (const id of ids) assert.ok(seen.includes(id), `${id} missing from the query`);
  assert.ok(pages.length >= 3, `7+ items in pages of 3 need 3+ pages, got ${JSON.stringify(pages)}`);
  assert.ok(pages.every((p) => p.count <= 3 && p.itemType === 'enrollment'), JSON.stringify(pages));
  assert.ok(items.every((e) => !(e.attestation.symmetricKey && e.attestation.symmetricKey.primaryKey)),
    'query results hide keys');
});

test('enrollment groups: query with paging', async () => {
  const prefix = uniqueId('node-svc-gq');
  const ids = [];
  for (let i = 0; i < 5; i++) {
    ids.push(`${prefix}-${i}`);
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: ids[i],
      attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
    });
  }

  const { items, pages } = await sdk.drainQuery(
    service.createEnrollmentGroupQuery({ query: 'SELECT * FROM enrollmentGroups' }, 2));

  const seen = items.map((g) => g.enrollmentGroupId);
  assert.equal(new Set(seen).size, seen.length);
  for (const id of ids) assert.ok(seen.includes(id), `${id} missing from the query`);
  assert.ok(pages.length >= 3, JSON.stringify(pages));
  assert.ok(pages.every((p) => p.count <= 2 && p.itemType === 'enrollmentGroup'), JSON.stringify(pages));
});

test('individual enrollments: bulk create, update, updateIfMatchETag, delete', async () => {
  const ids = [0, 1, 2].map(() => uniqueId('node-svc-bulk'));
  const enrollment = (registrationId) => ({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
  });

  const { responseBody: created } = await sdk.runBulkEnrollmentOperation(service, {
    mode: 'create',
    enrollments: ids.map(enrollment),
  });
  assert.equal(created.isSuccessful, true, JSON.stringify(created));
  for (const id of ids) await service.getIndividualEnrollment(id);

  // create fails per item for the existing one; the new one is created.
  const extra = uniqueId('node-svc-bulk');
  const { responseBody: mixed } = await sdk.runBulkEnrollmentOperation(service, {
    mode: 'create',
    enrollments: [enrollment(ids[0]), enrollment(extra)],
  });
  assert.equal(mixed.isSuccessful, false, JSON.stringify(mixed));
  assert.equal(mixed.errors.length, 1, JSON.stringify(mixed));
  assert.equal(mixed.errors[0].registrationId, ids[0]);
  assert.equal(Math.floor(mixed.errors[0].errorCode / 1000), 409, JSON.stringify(mixed));
  await service.getIndividualEnrollment(extra);

  // update = create or replace.
  const { responseBody: updated } = await sdk.runBulkEnrollmentOperation(service, {
    mode: 'update',
    enrollments: ids.map((id) => ({ ...enrollment(id), provisioningStatus: 'disabled' })),
  });
  assert.equal(updated.isSuccessful, true, JSON.stringify(updated));
  const { responseBody: disabled } = await service.getIndividualEnrollment(ids[1]);
  assert.equal(disabled.provisioningStatus, 'disabled');

  // updateIfMatchETag: the current etag wins, a stale one fails for that item only.
  const { responseBody: current } = await service.getIndividualEnrollment(ids[2]);
  const { responseBody: conditional } = await sdk.runBulkEnrollmentOperation(service, {
    mode: 'updateIfMatchETag',
    enrollments: [
      { ...enrollment(ids[1]), etag: '"stale-etag"' },
      { ...enrollment(ids[2]), etag: current.etag, provisioningStatus: 'enabled' },
    ],
  });
  assert.equal(conditional.isSuccessful, false, JSON.stringify(conditional));
  assert.deepEqual(conditional.errors.map((e) => e.registrationId), [ids[1]]);
  assert.equal(Math.floor(conditional.errors[0].errorCode / 1000), 412, JSON.stringify(conditional));
  assert.equal((await service.getIndividualEnrollment(ids[2])).responseBody.provisioningStatus, 'enabled');
  assert.equal((await service.getIndividualEnrollment(ids[1])).responseBody.provisioningStatus, 'disabled');

  const { responseBody: deleted } = await sdk.runBulkEnrollmentOperation(service, {
    mode: 'delete',
    enrollments: [...ids, extra].map((registrationId) => ({ registrationId, attestation: { type: 'symmetricKey' } })),
  });
  assert.equal(deleted.isSuccessful, true, JSON.stringify(deleted));
  for (const id of [...ids, extra]) {
    await sdk.rejectsWithStatus(service.getIndividualEnrollment(id), 404, 404201);
  }
});

test('individual enrollments: bulk of more than 10 is refused', async () => {
  const enrollments = Array.from({ length: 11 }, () => ({
    registrationId: uniqueId('node-svc-big'),
    attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
  }));
  await sdk.rejectsWithStatus(sdk.runBulkEnrollmentOperation(service, { mode: 'create', enrollments }), 400, 400005);
  await sdk.rejectsWithStatus(service.getIndividualEnrollment(enrollments[0].registrationId), 404, 404201);
});

test('enrollment groups: bulk create, update, delete', async () => {
  const ids = [0, 1].map(() => uniqueId('node-svc-gbulk'));
  const group = (enrollmentGroupId) => ({
    enrollmentGroupId,
    attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
  });

  const { responseBody: created } = await sdk.runBulkEnrollmentGroupOperation(dps.connectionString, {
    mode: 'create',
    enrollmentGroups: ids.map(group),
  });
  assert.equal(created.isSuccessful, true, JSON.stringify(created));
  for (const id of ids) await service.getEnrollmentGroup(id);

  const { responseBody: again } = await sdk.runBulkEnrollmentGroupOperation(dps.connectionString, {
    mode: 'create',
    enrollmentGroups: [group(ids[1])],
  });
  assert.equal(again.isSuccessful, false);
  assert.equal(again.errors[0].enrollmentGroupId, ids[1], JSON.stringify(again));
  assert.equal(Math.floor(again.errors[0].errorCode / 1000), 409, JSON.stringify(again));

  const { responseBody: updated } = await sdk.runBulkEnrollmentGroupOperation(dps.connectionString, {
    mode: 'update',
    enrollmentGroups: ids.map((id) => ({ ...group(id), allocationPolicy: 'static', iotHubs: [HUB_B] })),
  });
  assert.equal(updated.isSuccessful, true, JSON.stringify(updated));
  assert.deepEqual((await service.getEnrollmentGroup(ids[0])).responseBody.iotHubs, [HUB_B]);

  const { responseBody: deleted } = await sdk.runBulkEnrollmentGroupOperation(dps.connectionString, {
    mode: 'delete',
    enrollmentGroups: ids.map((enrollmentGroupId) => ({ enrollmentGroupId, attestation: { type: 'symmetricKey' } })),
  });
  assert.equal(deleted.isSuccessful, true, JSON.stringify(deleted));
  for (const id of ids) await sdk.rejectsWithStatus(service.getEnrollmentGroup(id), 404, 404202);
});

test('registration states: get, query by group with paging, delete with ETag', async () => {
  const enrollmentGroupId = uniqueId('node-svc-regs');
  const groupKey = randomKey();
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
  });
  const devices = [0, 1, 2].map(() => uniqueId('node-svc-rdev'));
  const results = [];
  for (const id of devices) results.push(await sdk.register(dps.ip, id, deriveDeviceKey(groupKey, id), 'http'));

  const states = [];
  for (let i = 0; i < devices.length; i++) states.push(await sdk.assertAssigned(service, results[i], devices[i]));
  for (const state of states) {
    assert.ok(state.createdDateTimeUtc && state.lastUpdatedDateTimeUtc, JSON.stringify(state));
  }

  const { items, pages } = await sdk.drainQuery(service.createEnrollmentGroupDeviceRegistrationStateQuery(
    { query: 'SELECT * FROM enrollmentGroups' }, enrollmentGroupId, 2));
  assert.deepEqual(items.map((s) => s.registrationId).sort(), [...devices].sort());
  assert.ok(pages.length >= 2 && pages.every((p) => p.count <= 2 && p.itemType === 'deviceRegistration'),
    JSON.stringify(pages));

  // Delete: a stale ETag is refused, the current one (by object) and no ETag (by ID) work.
  await sdk.rejectsWithStatus(service.deleteDeviceRegistrationState(devices[0], '"stale-etag"'), 412, 412001);
  await service.deleteDeviceRegistrationState(states[0]);
  await service.deleteDeviceRegistrationState(devices[1]);
  await sdk.rejectsWithStatus(service.getDeviceRegistrationState(devices[0]), 404, 404203);
  await sdk.rejectsWithStatus(service.getDeviceRegistrationState(devices[1]), 404, 404203);
  const { items: left } = await sdk.drainQuery(service.createEnrollmentGroupDeviceRegistrationStateQuery(
    { query: 'SELECT * FROM enrollmentGroups' }, enrollmentGroupId));
  assert.deepEqual(left.map((s) => s.registrationId), [devices[2]]);

  // Deleting the group keeps its registration records (spec 9.5).
  await service.deleteEnrollmentGroup(enrollmentGroupId);
  const { responseBody: kept } = await service.getDeviceRegistrationState(devices[2]);
  assert.equal(kept.status, 'assigned');
  await service.createOrUpdateEnrollmentGroup({
    enrollmentGroupId,
    attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
  });

  // Deleting the registration record makes the next registration an initial assignment again (spec 9.5).
  const again = await sdk.register(dps.ip, devices[0], deriveDeviceKey(groupKey, devices[0]), 'http');
  const state = await sdk.assertAssigned(service, again, devices[0]);
  assert.notEqual(state.createdDateTimeUtc, states[0].createdDateTimeUtc);
});

test('a tampered connection string (wrong key) is refused with 401', async () => {
  const registrationId = uniqueId('node-svc-auth');
  await service.createOrUpdateIndividualEnrollment({
    registrationId,
    attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
  });
  const key = dps.connectionString.match(/SharedAccessKey=([^;]+)/)[1];
  const wrongKey = randomKey(Buffer.from(key, 'base64').length);
  const tampered = sdk.serviceClient(dps.connectionString.replace(`SharedAccessKey=${key}`, `SharedAccessKey=${wrongKey}`));

  await sdk.rejectsWithStatus(tampered.getIndividualEnrollment(registrationId), 401, 401000);
  const victim = uniqueId('node-svc-victim');
  await sdk.rejectsWithStatus(tampered.createOrUpdateIndividualEnrollment({
    registrationId: victim,
    attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
  }), 401, 401000);
  await sdk.rejectsWithStatus(tampered.deleteIndividualEnrollment(registrationId), 401, 401000);

  // Nothing changed.
  await service.getIndividualEnrollment(registrationId);
  await sdk.rejectsWithStatus(service.getIndividualEnrollment(victim), 404, 404201);
});

test('an unknown shared access policy name is refused with 401', async () => {
  const tampered = sdk.serviceClient(
    dps.connectionString.replace('SharedAccessKeyName=provisioningserviceowner', 'SharedAccessKeyName=nosuchpolicy'));
  await sdk.rejectsWithStatus(tampered.getIndividualEnrollment(uniqueId('node-svc-x')), 401);
});
