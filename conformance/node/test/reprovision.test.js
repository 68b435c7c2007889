// Re-registration under each reprovision policy (spec 9.2) with the Azure IoT Node device SDK: a device is
// statically allocated to hub A, its enrollment is moved to hub B with a given reprovisionPolicy (ETag-guarded
// update through the service SDK), and the device registers again. Groups over HTTPS, individual enrollments
// over MQTT.
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.22')) return;

const assert = require('node:assert/strict');
const { test } = require('node:test');
const sdk = require('../lib/sdk');
const { HUB_A, HUB_B, uniqueId, randomKey, deriveDeviceKey } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);

// [updateHubAssignment, migrateDeviceData, hub after re-registration, substatus]. The Node SDK sends
// api-version 2019-03-31, before 2019-04-15, so going back to the initial assignment is reported as
// `initialAssignment`, not `reprovisionedToInitialAssignment` (spec 9.2).
const POLICIES = [
  [true, true, HUB_B, 'deviceDataMigrated'],
  [true, false, HUB_B, 'deviceDataReset'],
  [false, true, HUB_A, 'initialAssignment'],
  [false, false, HUB_A, 'initialAssignment'],
];

for (const [updateHubAssignment, migrateDeviceData, expectedHub, expectedSubstatus] of POLICIES) {
  const policy = `{updateHubAssignment: ${updateHubAssignment}, migrateDeviceData: ${migrateDeviceData}}`;

  test(`http, enrollment group, ${policy} -> ${expectedHub}, ${expectedSubstatus}`, async () => {
    const enrollmentGroupId = uniqueId('node-rep-group');
    const attestation = sdk.symmetricKeyAttestation(randomKey(), randomKey());
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation,
      allocationPolicy: 'static',
      iotHubs: [HUB_A],
    });
    const registrationId = uniqueId('node-rep-gdev');
    const key = deriveDeviceKey(attestation.symmetricKey.primaryKey, registrationId);
    const first = await sdk.register(dps.ip, registrationId, key, 'http');
    await sdk.assertAssigned(service, first, registrationId, { hubs: [HUB_A] });

    const { responseBody: group } = await service.getEnrollmentGroup(enrollmentGroupId);
    const { responseBody: moved } = await service.createOrUpdateEnrollmentGroup({
      ...group, // carries the etag: the SDK sends it as If-Match
      attestation,
      iotHubs: [HUB_B],
      reprovisionPolicy: { updateHubAssignment, migrateDeviceData },
    });
    assert.deepEqual(moved.iotHubs, [HUB_B]);

    const second = await sdk.register(dps.ip, registrationId, key, 'http');

    await sdk.assertAssigned(service, second, registrationId, { hubs: [expectedHub], substatus: expectedSubstatus });
    assert.equal(second.createdDateTimeUtc, first.createdDateTimeUtc);
  });

  test(`mqtt, individual enrollment, ${policy} -> ${expectedHub}, ${expectedSubstatus}`, async () => {
    const registrationId = uniqueId('node-rep-ind');
    const attestation = sdk.symmetricKeyAttestation(randomKey(), randomKey());
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation,
      allocationPolicy: 'static',
      iotHubs: [HUB_A],
    });
    const key = attestation.symmetricKey.primaryKey;
    const first = await sdk.register(dps.ip, registrationId, key, 'mqtt');
    await sdk.assertAssigned(service, first, registrationId, { hubs: [HUB_A] });

    const { responseBody: enrollment } = await service.getIndividualEnrollment(registrationId);
    await service.createOrUpdateIndividualEnrollment({
      ...enrollment,
      attestation,
      iotHubs: [HUB_B],
      reprovisionPolicy: { updateHubAssignment, migrateDeviceData },
    });

    const second = await sdk.register(dps.ip, registrationId, key, 'mqtt');

    await sdk.assertAssigned(service, second, registrationId, { hubs: [expectedHub], substatus: expectedSubstatus });
  });
}
