from sceneparse.cli.main import entry

entry()
