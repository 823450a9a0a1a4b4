package dev.xpertfl.app

import android.content.Context
import androidx.work.Constraints
import androidx.work.CoroutineWorker
import androidx.work.NetworkType
import androidx.work.OneTimeWorkRequest
import androidx.work.OneTimeWorkRequestBuilder
import androidx.work.WorkerParameters
import androidx.work.workDataOf
import dev.xpertfl.device.XpertDevice
import dev.xpertfl.fleet.FleetClient
import dev.xpertfl.fleet.FleetNode
import dev.xpertfl.fleet.Json
import java.io.File
import java.security.KeyPair

/**
 * The background job: connect to the SuperLink as a Flower SuperNode, answer XPerT's messages
 * (register, select, train) until [IDLE_LIMIT_MS] pass without a message, then leave. Training runs
 * in [OrtTrainer] (ONNX Runtime training, artifacts from xpert_fl.device). The node key stays the
 * same across jobs (a pre-registered key works with a SuperLink running --enable-supernode-auth).
 */
class XpertWorker(context: Context, params: WorkerParameters) : CoroutineWorker(context, params) {
    override suspend fun doWork(): Result {
        val s = Settings.load(applicationContext)
        if (s.superlink.isEmpty() || s.user.isEmpty()) return Result.failure(workDataOf("status" to "not configured"))
        val doc = Json.parse(File(s.embeddingFile).readText()) as Map<*, *>
        val vector = (doc["vector"] as List<*>).map { (it as Number).toDouble() }.toDoubleArray()
        val trainer = OrtTrainer(File(s.artifactsDir), File(s.dataFile), applicationContext.cacheDir)
        val device = XpertDevice(XpertDevice.Profile(s.user, null, vector, doc["summarizer"] as? String, null), trainer)
        val client = FleetClient(s.superlink, NodeKey.load(applicationContext), 60_000, "SuperNode")
        FleetNode(client, 30.0).concurrency(2).use { node ->
            node.connect()
            var idleSince = System.currentTimeMillis()
            while (!isStopped && System.currentTimeMillis() - idleSince < IDLE_LIMIT_MS) {
                val outcome = try {
                    node.pollOnce(device)
                } catch (e: java.io.IOException) {
                    setProgress(workDataOf("status" to "network: ${e.message}"))
                    Thread.sleep(5_000)
                    continue
                }
                if (outcome == null) {
                    Thread.sleep(3_000)
                } else {
                    idleSince = System.currentTimeMillis()
                    setProgress(workDataOf("status" to "$outcome; ${device.lastStatus}"))
                }
            }
        }
        trainer.close()
        return Result.success(workDataOf("status" to device.lastStatus))
    }

    companion object {
        const val NAME = "xpert-device"
        const val IDLE_LIMIT_MS = 10 * 60 * 1000L

        fun request(): OneTimeWorkRequest = OneTimeWorkRequestBuilder<XpertWorker>()
            .setConstraints(Constraints.Builder().setRequiredNetworkType(NetworkType.UNMETERED).setRequiresCharging(true).build())
            .build()
    }
}

/** The node's EC key pair (secp384r1), generated once and kept in app-private storage (X.509 + PKCS#8). */
object NodeKey {
    fun load(context: Context): KeyPair {
        val file = File(context.filesDir, "node-key.bin") // a production build would use the Android Keystore
        if (file.isFile) {
            val b = file.readBytes()
            val n = ((b[0].toInt() and 0xff) shl 8) or (b[1].toInt() and 0xff)
            val kf = java.security.KeyFactory.getInstance("EC")
            return KeyPair(
                kf.generatePublic(java.security.spec.X509EncodedKeySpec(b.copyOfRange(2, 2 + n))),
                kf.generatePrivate(java.security.spec.PKCS8EncodedKeySpec(b.copyOfRange(2 + n, b.size))),
            )
        }
        val kp = FleetClient.newKeyPair()
        val pub = kp.public.encoded
        file.writeBytes(byteArrayOf((pub.size shr 8).toByte(), pub.size.toByte()) + pub + kp.private.encoded)
        return kp
    }
}
