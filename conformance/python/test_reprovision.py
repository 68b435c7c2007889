"""Re-registration under each reprovision policy (spec 9.2) with the Azure IoT Python device SDK over MQTT.

A device is statically allocated to hub A; the enrollment is then changed (ETag-guarded PUT) to hub B with a
given `reprovisionPolicy`, and the device registers again.
"""

import pytest

from dps_harness import (
    HUB_A,
    HUB_B,
    assert_assigned,
    derive_device_key,
    random_key,
    register,
    symmetric_key_enrollment,
    symmetric_key_group,
    unique_id,
)

DPS_IP = "127.0.0.11"

# (updateHubAssignment, migrateDeviceData) -> (hub after re-registration, substatus). The SDK sends
# api-version 2019-03-31, before 2019-04-15, so "reprovisioned to the initial assignment" is reported as
# `initialAssignment` (spec 9.2, CS-SDK remark).
POLICIES = [
    pytest.param(True, True, HUB_B, "deviceDataMigrated", id="migrate"),
    pytest.param(True, False, HUB_B, "deviceDataReset", id="reset"),
    pytest.param(False, True, HUB_A, "initialAssignment", id="never-migrate"),
    pytest.param(False, False, HUB_A, "initialAssignment", id="never-reset"),
]


@pytest.mark.parametrize("update_hub, migrate, expected_hub, expected_substatus", POLICIES)
def test_individual_enrollment_reprovisioning(dps, update_hub, migrate, expected_hub, expected_substatus):
    registration_id = unique_id("py-rep")
    key, secondary = random_key(), random_key()
    dps.service.put_enrollment(
        symmetric_key_enrollment(registration_id, key, secondary, allocationPolicy="static", iotHubs=[HUB_A])
    )
    first = register(dps, registration_id, key)
    assert_assigned(dps, first, registration_id, hubs=(HUB_A,))

    enrollment = dps.service.get_enrollment(registration_id)
    enrollment["iotHubs"] = [HUB_B]
    enrollment["reprovisionPolicy"] = {"updateHubAssignment": update_hub, "migrateDeviceData": migrate}
    enrollment["attestation"] = {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": secondary}}
    updated = dps.service.put_enrollment(enrollment, etag=enrollment["etag"])
    assert updated["iotHubs"] == [HUB_B]
    assert updated["etag"] != enrollment["etag"]

    second = register(dps, registration_id, key)

    assert_assigned(dps, second, registration_id, hubs=(expected_hub,), substatus=expected_substatus)


@pytest.mark.parametrize("update_hub, migrate, expected_hub, expected_substatus", POLICIES)
def test_group_enrollment_reprovisioning(dps, update_hub, migrate, expected_hub, expected_substatus):
    group_id = unique_id("py-repgroup")
    group_key, group_secondary = random_key(), random_key()
    dps.service.put_group(
        symmetric_key_group(group_id, group_key, group_secondary, allocationPolicy="static", iotHubs=[HUB_A])
    )
    registration_id = unique_id("py-repdev")
    device_key = derive_device_key(group_key, registration_id)
    first = register(dps, registration_id, device_key, websockets=True)
    assert_assigned(dps, first, registration_id, hubs=(HUB_A,))

    group = dps.service.get_group(group_id)
    group["iotHubs"] = [HUB_B]
    group["reprovisionPolicy"] = {"updateHubAssignment": update_hub, "migrateDeviceData": migrate}
    group["attestation"] = {
        "type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_secondary},
    }
    dps.service.put_group(group, etag=group["etag"])

    second = register(dps, registration_id, device_key, websockets=True)

    assert_assigned(dps, second, registration_id, hubs=(expected_hub,), substatus=expected_substatus)
