from cloudland.cli.main import app

app()
