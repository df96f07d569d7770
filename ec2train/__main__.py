from ec2train.cli import program

if __name__ == "__main__":
    program()
