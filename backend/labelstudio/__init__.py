"""Label Studio: the one HTTP client, media fetching with Label Studio's auth, results ⇄ regions."""
