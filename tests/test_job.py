"""`ec2train job submit / cancel` against a real moto server, through the recording hop of
test_infra (every request seen): exactly the resources, with the security properties checked
field by field; --dry-run sends nothing; cancel leaves nothing and is safe twice."""

from __future__ import annotations

import base64
import hashlib
import json

import boto3
import pytest

from ec2train.job import api
from ec2train.job.spec import JobError
from tests.support.aws import DLAMI_ID
from tests.support.aws_recorder import AwsRecorder
from tests.support.cli import Quiet, assert_one_line_error, cli_in_process
from tests.support.iam import lint

BUCKET = "ec2train-jobs"
REGION = "us-east-1"
PREFIX = f"s3://{BUCKET}/dogs"
DATA = "s3://ec2train-data/dogImages.zip"


@pytest.fixture
def recorder(aws, monkeypatch):
    with AwsRecorder(aws) as rec:
        monkeypatch.setenv("AWS_ENDPOINT_URL", rec.url)
        boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
        rec.reset()
        yield rec


def clients():
    return {s: boto3.client(s, region_name=REGION) for s in ("ec2", "iam", "s3", "autoscaling")}


def request(wheel, **changes) -> api.SubmitRequest:
    base = dict(
        name="dogs", s3_uri=PREFIX, data=DATA, fit_args=["fit", "--epochs", "10"], ami=DLAMI_ID, wheel=str(wheel)
    )
    return api.SubmitRequest(**{**base, **changes})


def launch_template(ec2, name="ec2train-job-dogs") -> dict:
    [version] = ec2.describe_launch_template_versions(LaunchTemplateName=name)["LaunchTemplateVersions"]
    return version["LaunchTemplateData"]


def test_submit_creates_exactly_a_locked_down_job(recorder, wheel):
    c = clients()
    out = api.submit(
        request(wheel, spot=True, instance_type="g5.xlarge", ssh_from="203.0.113.7"), region=REGION, console=Quiet()
    )
    assert recorder.mutating() == [
        "CreateRole",
        "PutRolePolicy",
        "CreateInstanceProfile",
        "AddRoleToInstanceProfile",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "CreateLaunchTemplate",
        "CreateAutoScalingGroup",
        "PutScheduledUpdateGroupAction",
    ]
    tag = {"Key": "ec2train:job", "Value": "dogs"}

    # The launch template: IMDSv2 only with one hop, an encrypted gp3 disk, our profile and group.
    lt = launch_template(c["ec2"])
    assert lt["MetadataOptions"]["HttpTokens"] == "required" and lt["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert lt["MetadataOptions"]["HttpEndpoint"] == "enabled"
    [disk] = lt["BlockDeviceMappings"]
    assert disk["Ebs"] == {"VolumeSize": 100, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}
    assert lt["IamInstanceProfile"] == {"Name": "ec2train-job-dogs"} and lt["ImageId"] == DLAMI_ID
    assert lt["InstanceInitiatedShutdownBehavior"] == "terminate"
    [sg_id] = lt["SecurityGroupIds"]
    assert all(tag in spec["Tags"] for spec in lt["TagSpecifications"])
    script = base64.b64decode(lt["UserData"]).decode()
    settings = dict(line.split("=", 1) for line in script.splitlines()[1:9])
    # The exact wheel of this checkout, by hash, from the job's own prefix (issue 13.2).
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert settings["WHEEL_SHA256"] == sha and settings["INSTALL_SPEC"] == "''"
    assert settings["WHEEL_URI"] == f"{PREFIX}/_dist/{sha[:16]}/{wheel.name}" == out["wheel"]
    assert (
        c["s3"].get_object(Bucket=BUCKET, Key=f"dogs/_dist/{sha[:16]}/{wheel.name}")["Body"].read()
        == wheel.read_bytes()
    )
    assert (settings["JOB_URI"], settings["JOB_GROUP"]) == (PREFIX, "ec2train-job-dogs")
    assert "AWS_SECRET_ACCESS_KEY" not in script and "testing" not in script.split("\n# First-boot")[0]

    # The security group: one inbound rule, SSH from the one /32 asked for.
    [group] = c["ec2"].describe_security_groups(GroupIds=[sg_id])["SecurityGroups"]
    [rule] = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == ["203.0.113.7/32"] and rule["UserIdGroupPairs"] == []
    assert tag in group["Tags"]

    # The role: EC2 only; its prefix, the data (read-only) and its own group's capacity. Nothing else.
    role = c["iam"].get_role(RoleName="ec2train-job-dogs")["Role"]
    assert [s["Principal"] for s in role["AssumeRolePolicyDocument"]["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    assert tag in role["Tags"]
    assert c["iam"].list_role_policies(RoleName="ec2train-job-dogs")["PolicyNames"] == ["ec2train-job"]
    assert c["iam"].list_attached_role_policies(RoleName="ec2train-job-dogs")["AttachedPolicies"] == []
    doc = c["iam"].get_role_policy(RoleName="ec2train-job-dogs", PolicyName="ec2train-job")["PolicyDocument"]
    grants = {s["Sid"]: (s["Action"], s["Resource"], s.get("Condition")) for s in doc["Statement"]}
    assert grants == {
        "ListOnlyUnderThePrefix": (
            "s3:ListBucket",
            f"arn:aws:s3:::{BUCKET}",
            {"StringLike": {"s3:prefix": ["dogs/", "dogs/*"]}},
        ),
        "ReadWriteObjectsUnderThePrefix": (
            ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
            f"arn:aws:s3:::{BUCKET}/dogs/*",
            None,
        ),
        "ReadTheData": ("s3:GetObject", "arn:aws:s3:::ec2train-data/dogImages.zip", None),
        "EndItsOwnGroup": (
            "autoscaling:SetDesiredCapacity",
            "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:*:autoScalingGroupName/ec2train-job-dogs",
            None,
        ),
    }
    assert lint(doc) == []
    profile = c["iam"].get_instance_profile(InstanceProfileName="ec2train-job-dogs")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["ec2train-job-dogs"]

    # The group: one instance, spot over several g5 sizes with one GPU, AWS replaces reclaimed ones.
    [asg] = c["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=["ec2train-job-dogs"])[
        "AutoScalingGroups"
    ]
    assert (asg["MinSize"], asg["MaxSize"], asg["DesiredCapacity"]) == (0, 1, 1)
    assert asg["CapacityRebalance"] is True
    mixed = asg["MixedInstancesPolicy"]
    assert [o["InstanceType"] for o in mixed["LaunchTemplate"]["Overrides"]] == [
        "g5.xlarge",
        "g5.2xlarge",
        "g5.4xlarge",
        "g5.8xlarge",
    ]
    assert mixed["LaunchTemplate"]["LaunchTemplateSpecification"]["LaunchTemplateName"] == "ec2train-job-dogs"
    dist_ = mixed["InstancesDistribution"]
    assert (dist_["OnDemandPercentageAboveBaseCapacity"], dist_["SpotAllocationStrategy"]) == (
        0,
        "price-capacity-optimized",
    )
    tags = {t["Key"]: t["Value"] for t in asg["Tags"]}
    assert tags == {"ec2train:job": "dogs", "ec2train:job-uri": PREFIX}

    spec = json.loads(c["s3"].get_object(Bucket=BUCKET, Key="dogs/_job/job.json")["Body"].read())
    assert spec["fit_args"] == ["--epochs", "10"] and spec["data"] == DATA and spec["spot"] is True
    assert (
        json.loads(c["s3"].get_object(Bucket=BUCKET, Key="dogs/_job/status.json")["Body"].read())["state"]
        == "submitted"
    )

    st = api.status("dogs", region=REGION)
    assert st["state"] == "submitted" and st["group"]["desired"] == 1 and st["s3_uri"] == PREFIX

    with pytest.raises(JobError, match="a job named 'dogs' exists"):
        api.submit(request(wheel), region=REGION, console=Quiet())


def test_on_demand_without_ssh_has_no_inbound_rule(recorder, wheel):
    c = clients()
    api.submit(request(wheel, data=f"{PREFIX}/data/dogImages.zip"), region=REGION, console=Quiet())
    assert "AuthorizeSecurityGroupIngress" not in recorder.mutating()
    [sg_id] = launch_template(c["ec2"])["SecurityGroupIds"]
    [group] = c["ec2"].describe_security_groups(GroupIds=[sg_id])["SecurityGroups"]
    assert group["IpPermissions"] == []
    [asg] = c["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=["ec2train-job-dogs"])[
        "AutoScalingGroups"
    ]
    assert asg["LaunchTemplate"]["LaunchTemplateName"] == "ec2train-job-dogs" and "MixedInstancesPolicy" not in asg
    doc = c["iam"].get_role_policy(RoleName="ec2train-job-dogs", PolicyName="ec2train-job")["PolicyDocument"]
    # Data inside the job's prefix needs no statement of its own.
    assert [s["Sid"] for s in doc["Statement"]] == [
        "ListOnlyUnderThePrefix",
        "ReadWriteObjectsUnderThePrefix",
        "EndItsOwnGroup",
    ]


def test_dry_run_prints_every_request_and_policy_and_sends_nothing(recorder, wheel, capsys):

    code, out, err = cli_in_process(
        capsys,
        "job",
        "submit",
        "dogs",
        "--s3-uri",
        PREFIX,
        "--data",
        DATA,
        "--spot",
        "--region",
        REGION,
        "--dry-run",
        "--",
        "fit",
        "--epochs",
        "10",
    )
    assert code == 0, err
    assert recorder.calls == []  # not one request, not even a read
    for api_name in (
        "iam:CreateRole",
        "iam:PutRolePolicy",
        "iam:CreateInstanceProfile",
        "iam:AddRoleToInstanceProfile",
        "ec2:CreateSecurityGroup",
        "ec2:CreateLaunchTemplate",
        "autoscaling:CreateAutoScalingGroup",
    ):
        assert api_name in out
    assert '"autoscaling:SetDesiredCapacity"' in out and '"sts:AssumeRole"' in out  # the policy documents
    assert '"HttpTokens": "required"' in out and '"SpotAllocationStrategy": "price-capacity-optimized"' in out
    assert "JOB_URI=s3://ec2train-jobs/dogs" in out  # the user data, readable
    assert boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    recorder.reset()

    code, out, err = cli_in_process(
        capsys, "job", "cancel", "dogs", "--s3-uri", PREFIX, "--region", REGION, "--dry-run"
    )
    assert code == 0, err
    assert "autoscaling:DeleteAutoScalingGroup" in out and "iam:DeleteRole" in out
    assert out.splitlines()[1].startswith("removes    the group (terminating its instances)")
    assert "nothing of job dogs bills" in " ".join(out.split()) and "ec2:DeletePlacementGroup" in out
    assert recorder.calls == []


def test_cancel_removes_everything_and_is_safe_twice(recorder, wheel, capsys):

    c = clients()
    api.submit(request(wheel, spot=True), region=REGION, console=Quiet())
    [asg] = c["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=["ec2train-job-dogs"])[
        "AutoScalingGroups"
    ]
    instances = [i["InstanceId"] for i in asg["Instances"]]
    recorder.reset()

    code, out, err = cli_in_process(capsys, "job", "cancel", "dogs", "--region", REGION)
    assert code == 0, err
    assert "nothing left running or billing" in out
    assert set(recorder.mutating()) >= {
        "DeleteAutoScalingGroup",
        "DeleteLaunchTemplate",
        "DeleteSecurityGroup",
        "RemoveRoleFromInstanceProfile",
        "DeleteInstanceProfile",
        "DeleteRolePolicy",
        "DeleteRole",
    }
    assert (
        c["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=["ec2train-job-dogs"])["AutoScalingGroups"]
        == []
    )
    states = {
        i["State"]["Name"]
        for r in c["ec2"].describe_instances(InstanceIds=instances)["Reservations"]
        for i in r["Instances"]
    }
    assert states <= {"terminated", "shutting-down"}
    assert (
        c["ec2"].describe_launch_templates(Filters=[{"Name": "tag:ec2train:job", "Values": ["dogs"]}])[
            "LaunchTemplates"
        ]
        == []
    )
    assert (
        c["ec2"].describe_security_groups(Filters=[{"Name": "tag:ec2train:job", "Values": ["dogs"]}])["SecurityGroups"]
        == []
    )
    for call in (
        lambda: c["iam"].get_role(RoleName="ec2train-job-dogs"),
        lambda: c["iam"].get_instance_profile(InstanceProfileName="ec2train-job-dogs"),
    ):
        with pytest.raises(c["iam"].exceptions.NoSuchEntityException):
            call()
    keys = [o["Key"] for o in c["s3"].list_objects_v2(Bucket=BUCKET, Prefix="dogs/").get("Contents", [])]
    assert not [k for k in keys if "/_dist/" in k]  # the wheel it uploaded went too; the status stays
    st = api.status("dogs", s3_uri=PREFIX, region=REGION)
    assert st["state"] == "cancelled" and st["group"] is None

    recorder.reset()
    code, out, err = cli_in_process(capsys, "job", "cancel", "dogs", "--s3-uri", PREFIX, "--region", REGION)
    assert code == 0, err
    assert recorder.mutating() == [] and "nothing was there" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["NoCaps"], "job name 'NoCaps'"),
        (["dogs", "--", "serve"], "a job runs `ec2train fit`, not `serve`"),
        (["dogs", "--", "fit", "--s3-uri", "s3://x/y"], "--s3-uri is set by the job runner"),
        (["dogs", "--", "fit", "--data=here"], "--data is set by the job runner"),
        (["dogs", "--max-hours", "0"], "--max-hours must be > 0"),
        (["dogs", "--ssh-from", "0.0.0.0/0"], "--ssh-from '0.0.0.0/0'"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(recorder, capsys, args, needle):

    name, rest = args[0], args[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    code, out, err = cli_in_process(
        capsys,
        "job",
        "submit",
        name,
        "--s3-uri",
        PREFIX,
        "--data",
        DATA,
        "--region",
        REGION,
        *rest[:split],
        *(rest[split:] or []),
    )
    assert_one_line_error(code, err, needle)
    assert recorder.mutating() == []


# --------------------------------------------------------------------------- several nodes


def test_a_multi_node_job_is_one_zone_a_placement_group_and_a_members_only_security_group(recorder, wheel):
    c = clients()
    api.submit(request(wheel, nodes=4, spot=True, max_hours=6), region=REGION, console=Quiet())
    assert recorder.mutating() == [
        "CreateRole",
        "PutRolePolicy",
        "CreateInstanceProfile",
        "AddRoleToInstanceProfile",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "CreatePlacementGroup",
        "CreateLaunchTemplate",
        "CreateAutoScalingGroup",
        "PutScheduledUpdateGroupAction",
    ]
    # moto has no placement groups: the recording hop answered, and saw exactly this request.
    pg = recorder.params("CreatePlacementGroup")
    assert (pg["GroupName"], pg["Strategy"], pg["TagSpecification.1.ResourceType"]) == (
        "ec2train-job-dogs",
        "cluster",
        "placement-group",
    )
    assert recorder.placement_groups["ec2train-job-dogs"]["tags"]["ec2train:job"] == "dogs"

    # The security group's only inbound rule admits its own members: NCCL, gloo, the c10d store.
    [sg_id] = launch_template(c["ec2"])["SecurityGroupIds"]
    [group] = c["ec2"].describe_security_groups(GroupIds=[sg_id])["SecurityGroups"]
    [rule] = group["IpPermissions"]
    assert rule["IpProtocol"] == "-1" and rule["IpRanges"] == [] and rule.get("Ipv6Ranges", []) == []
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [sg_id]

    [asg] = c["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=["ec2train-job-dogs"])[
        "AutoScalingGroups"
    ]
    assert (asg["MinSize"], asg["MaxSize"], asg["DesiredCapacity"]) == (0, 4, 4)
    assert asg["PlacementGroup"] == "ec2train-job-dogs" and "," not in asg["VPCZoneIdentifier"]  # one subnet
    overrides = [o["InstanceType"] for o in asg["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]]
    assert overrides == ["g4dn.xlarge", "g4dn.2xlarge", "g4dn.4xlarge"]  # none above 2.5x the asked price

    # The group ends itself at --max-hours (plus the runners' grace) even with no instance left.
    spec = json.loads(c["s3"].get_object(Bucket=BUCKET, Key="dogs/_job/job.json")["Body"].read())
    [end] = c["autoscaling"].describe_scheduled_actions(AutoScalingGroupName="ec2train-job-dogs")[
        "ScheduledUpdateGroupActions"
    ]
    assert (end["MinSize"], end["MaxSize"], end["DesiredCapacity"]) == (0, 0, 0)
    assert end["StartTime"].timestamp() == pytest.approx(spec["submitted_at"] + 6 * 3600 + 600, abs=1)
    assert (spec["nodes"], spec["efa"], spec["rdzv_port"]) == (4, False, 29400)
    # Finding each other needs nothing beyond the prefix: the policy is the single-node one.
    doc = c["iam"].get_role_policy(RoleName="ec2train-job-dogs", PolicyName="ec2train-job")["PolicyDocument"]
    assert [s["Sid"] for s in doc["Statement"]] == [
        "ListOnlyUnderThePrefix",
        "ReadWriteObjectsUnderThePrefix",
        "ReadTheData",
        "EndItsOwnGroup",
    ]
    assert lint(doc) == []

    # Cancel removes the placement group too, after the instances are gone.
    recorder.reset()
    api.cancel("dogs", region=REGION, console=Quiet())
    deletes = recorder.mutating()
    assert deletes.index("DeletePlacementGroup") > deletes.index("DeleteAutoScalingGroup")
    assert recorder.placement_groups == {}


def test_efa_rides_on_the_first_network_interface_and_the_group_admits_its_members_both_ways(recorder, wheel):
    c = clients()
    api.submit(request(wheel, nodes=2, efa=True, instance_type="g5.12xlarge"), region=REGION, console=Quiet())
    assert "DescribeInstanceTypes" in recorder.actions("ec2")  # EC2 itself says the type has EFA
    lt = launch_template(c["ec2"])
    [nic] = lt["NetworkInterfaces"]
    assert (nic["DeviceIndex"], nic["InterfaceType"], nic["DeleteOnTermination"]) == (0, "efa", True)
    assert "SecurityGroupIds" not in lt
    [group] = c["ec2"].describe_security_groups(GroupIds=nic["Groups"])["SecurityGroups"]
    assert [p["GroupId"] for p in group["IpPermissions"][0]["UserIdGroupPairs"]] == nic["Groups"]
    egress = [r for r in group["IpPermissionsEgress"] if r.get("UserIdGroupPairs")]
    assert [p["GroupId"] for p in egress[0]["UserIdGroupPairs"]] == nic["Groups"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--nodes", "2", "--efa", "--type", "g4dn.xlarge"], "--efa: g4dn.xlarge has no Elastic Fabric Adapter"),
        (["--nodes", "0"], "--nodes 0: from 1 to 64"),
        (["--nodes", "2", "--subnet-id", "subnet-a", "--subnet-id", "subnet-b"], "give one --subnet-id"),
        (["--", "fit", "--nproc-per-node", "many"], "--nproc-per-node 'many'"),
    ],
)
def test_multi_node_requests_that_cannot_work_are_one_line_and_send_nothing(recorder, capsys, args, needle):
    split = args.index("--") if "--" in args else len(args)
    for dry in ([], ["--dry-run"]):
        code, _, err = cli_in_process(
            capsys, "job", "submit", "dogs", "--s3-uri", PREFIX, "--data", DATA, "--region", REGION,
            *args[:split], *dry, *args[split:],
        )  # fmt: skip
        assert_one_line_error(code, err, needle)
    assert recorder.calls == []


@pytest.mark.parametrize("prefix", ["dogs run", "dogs$(id)", "dogs/*", "dogs'x"])
def test_a_prefix_iam_cannot_express_is_refused_before_anything_is_built_or_sent(recorder, capsys, prefix):
    """It used to fail with a traceback after the wheel, job.json and status.json were uploaded."""
    code, _, err = cli_in_process(
        capsys, "job", "submit", "dogs", "--s3-uri", f"s3://{BUCKET}/{prefix}", "--data", DATA, "--region", REGION
    )
    assert_one_line_error(code, err, "IAM can only take letters, digits")
    assert recorder.calls == []


def test_the_dry_run_of_a_4_node_spot_job_starts_with_what_it_creates_and_costs(recorder, capsys):
    code, out, err = cli_in_process(
        capsys, "job", "submit", "dogs", "--s3-uri", PREFIX, "--data", DATA, "--region", REGION,
        "--nodes", "4", "--spot", "--max-hours", "12", "--dry-run", "--", "fit", "--epochs", "10",
    )  # fmt: skip
    assert code == 0, err
    assert recorder.calls == []
    head = out.split("A real run first reads")[0]
    lines = head.splitlines()
    assert lines[0].startswith("dry run: job dogs in us-east-1; nothing below is sent")
    assert lines[1] == "summary of job dogs:"
    text = " ".join(head.split())
    for said in (
        "an Auto Scaling group of 4 instances in a cluster placement group (one zone)",
        "a security group (inbound: only from its own members)",
        "4 spot, price-capacity-optimized over g4dn.xlarge, g4dn.2xlarge, g4dn.4xlarge",
        "$0.21-$0.48 per instance-hour at typical spot prices ($0.53-$1.20 on-demand); 4 nodes: $0.84-$1.92 per hour",
        f"worst case ${12 * (4 * 1.204 + 4 * 100 * 0.08 / 730):,.2f} if all 4 nodes run the full --max-hours 12",
        "at --max-hours 12, or with `ec2train job cancel dogs`",
    ):
        assert said in text, said
    assert len(lines) <= 20 and all(len(line) <= 110 for line in lines[1:])  # a summary: the requests follow
    assert "training starts when all 4 run at once in one zone" in text
    assert '"PlacementGroup": "ec2train-job-dogs"' in out and '"DesiredCapacity": 4' in out
    assert "ec2:CreatePlacementGroup" in out


def test_job_status_says_when_the_group_waits_for_capacity_in_aws_own_words(recorder, wheel, capsys):
    api.submit(request(wheel, nodes=2, spot=True), region=REGION, console=Quiet())
    c = clients()
    [asg] = c["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=["ec2train-job-dogs"])[
        "AutoScalingGroups"
    ]
    instance = asg["Instances"][0]["InstanceId"]
    # moto always finds capacity: the recording hop answers as AWS does when the zone has none.
    said = (
        "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available "
        "that matches your request. Launching EC2 instance failed."
    )
    recorder.canned["DescribeScalingActivities"] = _activities_xml(said)
    recorder.canned["DescribeAutoScalingGroups"] = _group_xml("ec2train-job-dogs", 2, [instance])
    st = api.status("dogs", s3_uri=PREFIX, region=REGION)
    assert st["capacity"] == f"waiting for capacity: 1 of 2 instances; AWS says: {said}"
    code, out, err = cli_in_process(capsys, "job", "status", "dogs", "--s3-uri", PREFIX, "--region", REGION)
    assert code == 0, err
    assert "InsufficientInstanceCapacity" in out and "1 of 2 instances" in " ".join(out.split())


def _activities_xml(message: str) -> str:
    ns = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
    return (
        f'<DescribeScalingActivitiesResponse xmlns="{ns}"><DescribeScalingActivitiesResult><Activities><member>'
        "<ActivityId>a-1</ActivityId><AutoScalingGroupName>ec2train-job-dogs</AutoScalingGroupName>"
        "<Description>Launching a new EC2 instance.  Status Reason: no capacity</Description>"
        "<Cause>a user request raised the desired capacity to 2</Cause><StartTime>2026-12-07T10:00:00Z</StartTime>"
        f"<StatusCode>Failed</StatusCode><StatusMessage>{message}</StatusMessage><Progress>100</Progress>"
        "</member></Activities></DescribeScalingActivitiesResult>"
        "<ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata></DescribeScalingActivitiesResponse>"
    )


def _group_xml(name: str, desired: int, instances: list[str]) -> str:
    ns = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
    members = "".join(
        f"<member><InstanceId>{i}</InstanceId><AvailabilityZone>us-east-1a</AvailabilityZone>"
        "<LifecycleState>InService</LifecycleState><HealthStatus>Healthy</HealthStatus>"
        "<InstanceType>g4dn.xlarge</InstanceType><ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>"
        for i in instances
    )
    return (
        f'<DescribeAutoScalingGroupsResponse xmlns="{ns}"><DescribeAutoScalingGroupsResult><AutoScalingGroups>'
        f"<member><AutoScalingGroupName>{name}</AutoScalingGroupName><MinSize>0</MinSize><MaxSize>{desired}</MaxSize>"
        f"<DesiredCapacity>{desired}</DesiredCapacity><DefaultCooldown>300</DefaultCooldown>"
        "<AvailabilityZones><member>us-east-1a</member></AvailabilityZones><HealthCheckType>EC2</HealthCheckType>"
        f"<CreatedTime>2026-12-07T09:00:00Z</CreatedTime><Instances>{members}</Instances></member>"
        "</AutoScalingGroups></DescribeAutoScalingGroupsResult>"
        "<ResponseMetadata><RequestId>r-2</RequestId></ResponseMetadata></DescribeAutoScalingGroupsResponse>"
    )
