"""The FiftyOne face: dataset sync, the analyses behind the plugin's operators, the App server."""
