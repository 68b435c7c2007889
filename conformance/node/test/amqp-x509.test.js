// Azure IoT Node device SDK over AMQP with X.509 attestation (azure-iot-provisioning-device-amqp +
// azure-iot-security-x509) against dps-server: the device authenticates with its TLS client certificate only
// (spec 3.1, 7): AMQP 1.0 on 5671 and AMQP over WebSocket on 443; certificates from conformance/pki.py, CA
// certificates verified by proof of possession through the service API.
'use strict';

const harness = require('../lib/harness');
if (harness.wrapTestFile(__filename, '127.0.0.25')) return;

const assert = require('node:assert/strict');
const { after, test } = require('node:test');
const sdk = require('../lib/sdk');
const { uniqueId } = harness;

const dps = harness.server();
const service = sdk.serviceClient(dps.connectionString);
const pki = new harness.Pki();
after(() => pki.cleanup());

function credentials(device, leafOnly = false) {
  return { cert: leafOnly ? device.certPem : device.chainPem, key: device.keyPem };
}

function x509Attestation(field, primary) {
  return { type: 'x509', x509: { [field]: { primary: { certificate: primary } } } };
}

// A certificate refusal over AMQP: the register message gets a rejected outcome whose error (which the SDK
// hands back as it came) has condition amqp:unauthorized-access and the JSON error body as description
// (spec 3.3).
async function rejectsOverAmqp(promise, errorCode) {
  let error;
  try {
    await promise;
  } catch (e) {
    error = e;
  }
  assert.ok(error, 'expected the registration to fail, it succeeded');
  assert.equal(error.condition, 'amqp:unauthorized-access', JSON.stringify(error));
  const body = JSON.parse(error.description);
  assert.equal(body.errorCode, errorCode, error.description);
  assert.ok(body.trackingId && body.message, error.description);
  return error;
}

for (const transport of Object.keys(sdk.AMQP_TRANSPORTS)) {
  test(`${transport}: individual enrollment, self-signed device certificate`, async () => {
    const registrationId = uniqueId(`node-${transport}-x509-self`);
    const device = pki.selfSigned(registrationId, { key: transport === 'amqp' ? 'rsa' : 'ec' });
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: x509Attestation('clientCertificates', device.certPem),
    });

    const result = await sdk.registerX509(dps.ip, registrationId, credentials(device), transport);

    await sdk.assertAssigned(service, result, registrationId);
    sdk.assertCertificateInfo(result.x509.certificateInfo, device);
  });

  test(`${transport}: individual enrollment, CA-signed device certificate`, async () => {
    const root = pki.root(uniqueId('node-root'));
    const int1 = pki.intermediate(root, uniqueId('node-int1'));
    await sdk.uploadVerifiedCa(dps.connectionString, pki, uniqueId('node-ca'), root);
    const registrationId = uniqueId(`node-${transport}-x509-ca`);
    const device = pki.device(int1, registrationId);
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: x509Attestation('clientCertificates', device.certPem),
    });

    const result = await sdk.registerX509(dps.ip, registrationId, credentials(device), transport);

    await sdk.assertAssigned(service, result, registrationId);
    assert.equal(result.x509.certificateInfo.issuerName, `CN=${int1.cn}`);
  });

  test(`${transport}: enrollment group on a verified root, device sends leaf + intermediates`, async () => {
    const root = pki.root(uniqueId('node-root'));
    const int1 = pki.intermediate(root, uniqueId('node-int1'));
    const int2 = pki.intermediate(int1, uniqueId('node-int2'));
    await sdk.uploadVerifiedCa(dps.connectionString, pki, uniqueId('node-ca'), root);
    const enrollmentGroupId = uniqueId(`node-${transport}-x509-group`);
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId,
      attestation: x509Attestation('signingCertificates', root.certPem),
    });
    const device = pki.device(int2, uniqueId(`node-${transport}-x509-gdev`));

    const result = await sdk.registerX509(dps.ip, device.cn, credentials(device), transport);

    await sdk.assertAssigned(service, result, device.cn);
    assert.equal(result.x509.enrollmentGroupId, enrollmentGroupId, JSON.stringify(result.x509));
    sdk.assertCertificateInfo(result.x509.signingCertificateInfo, root);
  });

  test(`${transport}: a device of an unverified CA is refused with 401002 and gets no registration`, async () => {
    const root = pki.root(uniqueId('node-root'));
    await sdk.certificates.put(dps.connectionString, uniqueId('node-ca'), root.certPem);
    const registrationId = uniqueId(`node-${transport}-x509-unverified`);
    const device = pki.device(root, registrationId);
    await service.createOrUpdateIndividualEnrollment({
      registrationId,
      attestation: x509Attestation('clientCertificates', device.certPem),
    });

    await rejectsOverAmqp(sdk.registerX509(dps.ip, registrationId, credentials(device), transport), 401002);

    await sdk.rejectsWithStatus(service.getDeviceRegistrationState(registrationId), 404, 404203);
  });
}
