// Azure IoT Node device SDK over AMQP (azure-iot-provisioning-device + -amqp transport +
// azure-iot-security-symmetric-key) against dps-server: symmetric-key individual and group enrollments over
// AMQP 1.0 on TLS (port 5671, SASL PLAIN with the SAS token) and AMQP over WebSocket (443, subprotocol
// AMQPWSB10), and re-registration under the reprovision policies. Spec sections 3, 4, 9.2.
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.24')) return;

const assert = require('node:assert/strict');
const { test } = require('node:test');
const sdk = require('../lib/sdk');
const { HUB_A, HUB_B, uniqueId, randomKey, deriveDeviceKey } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);

for (const transport of Object.keys(sdk.AMQP_TRANSPORTS)) {
  test(`${transport}: individual enrollment`, async () => {
    const registrationId = uniqueId(`node-${transport}-ind`);
    const primaryKey = randomKey();
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: sdk.symmetricKeyAttestation(primaryKey, randomKey()),
    });

    const result = await sdk.register(dps.ip, registrationId, primaryKey, transport);

    await sdk.assertAssigned(service, result, registrationId);
  });

  test(`${transport}: individual enrollment with deviceId, static hub and the secondary key`, async () => {
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

    const result = await sdk.register(dps.ip, registrationId, mechanism.symmetricKey.secondaryKey, transport);

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
    const device2 = uniqueId(`Node.Mixed_Case:${transport}`);

    const result1 = await sdk.register(dps.ip, device1, deriveDeviceKey(groupPrimary, device1), transport);
    const result2 = await sdk.register(dps.ip, device2, deriveDeviceKey(groupSecondary, device2), transport);

    await sdk.assertAssigned(service, result1, device1);
    await sdk.assertAssigned(service, result2, device2);
    const { items } = await sdk.drainQuery(
      service.createEnrollmentGroupDeviceRegistrationStateQuery({ query: 'SELECT * FROM enrollmentGroups' },
        enrollmentGroupId, 10));
    assert.deepEqual(items.map((s) => s.registrationId).sort(), [device1, device2].sort());
  });

  test(`${transport}: custom payload is accepted`, async () => {
    const enrollmentGroupId = uniqueId(`node-${transport}-payload`);
    const groupKey = randomKey();
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation: sdk.symmetricKeyAttestation(groupKey, randomKey()),
    });
    const registrationId = uniqueId(`node-${transport}-pdev`);

    const result = await sdk.register(dps.ip, registrationId, deriveDeviceKey(groupKey, registrationId), transport,
      { modelId: 'dtmi:example:thermostat;1' });

    await sdk.assertAssigned(service, result, registrationId);
    assert.equal(result.payload, undefined, JSON.stringify(result));
  });

  test(`${transport}: a wrong device key is refused at SASL and leaves no registration`, async () => {
    const registrationId = uniqueId(`node-${transport}-bad`);
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: sdk.symmetricKeyAttestation(randomKey(), randomKey()),
    });

    await assert.rejects(sdk.register(dps.ip, registrationId, randomKey(), transport));

    await sdk.rejectsWithStatus(service.getDeviceRegistrationState(registrationId), 404, 404203);
  });

  test(`${transport}: a disabled enrollment is not assigned`, async () => {
    const registrationId = uniqueId(`node-${transport}-off`);
    const key = randomKey();
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: sdk.symmetricKeyAttestation(key, randomKey()),
      provisioningStatus: 'disabled',
    });

    await assert.rejects(sdk.register(dps.ip, registrationId, key, transport));
  });
}

// [updateHubAssignment, migrateDeviceData, hub after re-registration, substatus] (spec 9.2; the Node SDK sends
// api-version 2019-03-31, so going back to the initial hub is reported `initialAssignment`).
const POLICIES = [
  [true, true, HUB_B, 'deviceDataMigrated'],
  [true, false, HUB_B, 'deviceDataReset'],
  [false, true, HUB_A, 'initialAssignment'],
];

for (const [i, [updateHubAssignment, migrateDeviceData, expectedHub, expectedSubstatus]] of POLICIES.entries()) {
  const transport = i % 2 === 0 ? 'amqp' : 'amqp-ws';
  const policy = `{updateHubAssignment: ${updateHubAssignment}, migrateDeviceData: ${migrateDeviceData}}`;
  test(`${transport}, enrollment group, ${policy} -> ${expectedHub}, ${expectedSubstatus}`, async () => {
    const enrollmentGroupId = uniqueId('node-amqp-rep');
    const attestation = sdk.symmetricKeyAttestation(randomKey(), randomKey());
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation,
      allocationPolicy: 'static',
      iotHubs: [HUB_A],
    });
    const registrationId = uniqueId('node-amqp-rep-dev');
    const key = deriveDeviceKey(attestation.symmetricKey.primaryKey, registrationId);
    const first = await sdk.register(dps.ip, registrationId, key, transport);
    await sdk.assertAssigned(service, first, registrationId, { hubs: [HUB_A] });

    const { responseBody: group } = await service.getEnrollmentGroup(enrollmentGroupId);
    await service.createOrUpdateEnrollmentGroup({
      ...group,
      attestation,
      iotHubs: [HUB_B],
      reprovisionPolicy: { updateHubAssignment, migrateDeviceData },
    });

    const second = await sdk.register(dps.ip, registrationId, key, transport);

    await sdk.assertAssigned(service, second, registrationId, { hubs: [expectedHub], substatus: expectedSubstatus });
    assert.equal(second.createdDateTimeUtc, first.createdDateTimeUtc);
  });
}
