package dev.xpertfl.app

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.work.ExistingWorkPolicy
import androidx.work.WorkManager

/** Settings screen: server address, user id, data/embedding files, ORT artifacts; starts the worker. */
class MainActivity : AppCompatActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        val s = Settings.load(this)
        val fields = mapOf(
            R.id.superlink to s.superlink, R.id.user to s.user, R.id.data to s.dataFile,
            R.id.embedding to s.embeddingFile, R.id.artifacts to s.artifactsDir,
        )
        fields.forEach { (id, value) -> findViewById<EditText>(id).setText(value) }
        val status = findViewById<TextView>(R.id.status)
        findViewById<Button>(R.id.start).setOnClickListener {
            fun text(id: Int) = findViewById<EditText>(id).text.toString().trim()
            Settings(text(R.id.superlink), text(R.id.user), text(R.id.data), text(R.id.embedding), text(R.id.artifacts)).save(this)
            WorkManager.getInstance(this).enqueueUniqueWork(XpertWorker.NAME, ExistingWorkPolicy.REPLACE, XpertWorker.request())
            status.text = "background job enqueued (runs when the device is charging and on an unmetered network)"
        }
        WorkManager.getInstance(this).getWorkInfosForUniqueWorkLiveData(XpertWorker.NAME).observe(this) { infos ->
            infos.firstOrNull()?.let { status.text = "${it.state}: ${it.progress.getString("status") ?: ""}" }
        }
    }
}
