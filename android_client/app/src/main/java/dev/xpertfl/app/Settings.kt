package dev.xpertfl.app

import android.content.Context

/** What the user configures: where the SuperLink is, who the device is, and its local files. */
data class Settings(
    val superlink: String,
    val user: String,
    val dataFile: String,      // tokenized JSONL: {"input_ids": [...], "labels": [...], "test": false}
    val embeddingFile: String, // {"vector": [...], "summarizer": "..."}: the device's drift embedding
    val artifactsDir: String,  // ORT training artifacts + manifest.json from xpert_fl.device
) {
    fun save(context: Context) {
        context.getSharedPreferences(PREFS, Context.MODE_PRIVATE).edit()
            .putString("superlink", superlink).putString("user", user).putString("data", dataFile)
            .putString("embedding", embeddingFile).putString("artifacts", artifactsDir).apply()
    }

    companion object {
        const val PREFS = "xpert"

        fun load(context: Context): Settings {
            val p = context.getSharedPreferences(PREFS, Context.MODE_PRIVATE)
            return Settings(
                p.getString("superlink", "") ?: "", p.getString("user", "") ?: "", p.getString("data", "") ?: "",
                p.getString("embedding", "") ?: "", p.getString("artifacts", "") ?: "",
            )
        }
    }
}
