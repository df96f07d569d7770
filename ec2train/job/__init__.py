"""Unattended training jobs on EC2, with no SageMaker and no controller of ours (docs/jobs.md).

api       submit / status / logs / cancel (the library behind `ec2train job`)
plan      what submit creates and cancel deletes, as request plans (dry run == real run)
spec      the job's name, settings (job.json) and S3 layout
state     status.json and the runner's decisions on it (pure)
runner    the module the instance's user data starts: trains, reports, ends the job
dist      the install path: this checkout's wheel, uploaded to S3, installed by hash
cost      the built-in price table and the cost estimate
autostop  the idle check behind `infra/launch_ec2.sh --autostop N`
user_data.sh  the first-boot script of every box and job instance

The typer sub-app `ec2train job` is ec2train/cli/job.py (thin: it calls api).
"""
