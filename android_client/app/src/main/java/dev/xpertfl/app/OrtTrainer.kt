package dev.xpertfl.app

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtTrainingSession
import dev.xpertfl.device.Adapter
import dev.xpertfl.device.Trainer
import dev.xpertfl.fleet.Json
import dev.xpertfl.fleet.NdArray
import java.io.File
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.LongBuffer
import java.nio.channels.FileChannel
import kotlin.math.sqrt

/**
 * [Trainer] on ONNX Runtime's on-device training API (onnxruntime-training-android 1.19.2) with an
 * artifact set written by `xpert_fl.device.artifacts` (training/eval/optimizer models, nominal
 * checkpoint, base_weights.bin, manifest.json). Per pLLM only the LoRA values travel: they are
 * written into the LoRA slots of the full parameter buffer before training and read back after.
 *
 * Data file: JSONL, one tokenized sample per line {"input_ids": [...], "labels": [...], "test": bool}
 * (labels -100 on prompt tokens), written off the phone with the base model's tokenizer: the app has
 * no tokenizer. NOT BUILT OR RUN IN THIS REPOSITORY (no Android SDK); see android_client/README.md.
 */
class OrtTrainer(private val artifacts: File, private val dataFile: File, private val scratch: File) : Trainer, AutoCloseable {
    private val manifest = Json.parseObject(File(artifacts, "manifest.json").readText())
    private val lora = manifest["lora"] as Map<*, *>
    private val params = (manifest["parameters"] as List<*>).map { it as Map<*, *> }
    private val trainable = params.filter { it["trainable"] == true }
    private val env = OrtEnvironment.getEnvironment()

    private fun shape(p: Map<*, *>) = (p["shape"] as List<*>).map { (it as Number).toLong() }.toLongArray()
    private fun numel(s: LongArray) = s.fold(1L) { a, b -> a * b }

    override fun initial(): Adapter {
        // PEFT's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0: the base model itself.
        val rng = java.util.Random(0)
        val tensors = LinkedHashMap<String, NdArray>()
        for (p in trainable) {
            val s = shape(p)
            val name = p["peft_name"] as String
            val values = FloatArray(numel(s).toInt())
            if (name.endsWith("lora_A.weight")) {
                val bound = 1.0 / sqrt(s[1].toDouble())
                for (i in values.indices) values[i] = ((rng.nextDouble() * 2 - 1) * bound).toFloat()
            }
            tensors[name] = NdArray.ofFloats(s, values)
        }
        val config = linkedMapOf<String, Any?>(
            "peft_type" to "LORA", "r" to (lora["r"] as Number).toLong(), "lora_alpha" to (lora["alpha"] as Number).toDouble(),
            "target_modules" to lora["target_modules"], "use_rslora" to lora["use_rslora"], "lora_dropout" to 0.0,
            "bias" to "none", "task_type" to "CAUSAL_LM",
        )
        return Adapter(config, tensors, manifest["base_fingerprint"] as String)
    }

    override fun check(start: Adapter) {
        fun mismatch(why: String): Nothing = throw Adapter.AdapterException("adapter does not match the ORT artifacts in $artifacts: $why")
        if (start.baseFingerprint != manifest["base_fingerprint"]) mismatch("base model ${start.baseFingerprint} vs ${manifest["base_fingerprint"]}")
        val targets = (start.config["target_modules"] as? List<*>)?.map { it.toString() }?.sorted()
        if (start.rank().toLong() != (lora["r"] as Number).toLong()) mismatch("rank ${start.rank()} vs ${lora["r"]} (a merge concatenates ranks: artifacts are per rank)")
        if ((start.config["lora_alpha"] as Number).toDouble() != (lora["alpha"] as Number).toDouble()) mismatch("lora_alpha ${start.config["lora_alpha"]} vs ${lora["alpha"]}")
        if (targets != (lora["target_modules"] as List<*>).map { it.toString() }.sorted()) mismatch("target_modules $targets vs ${lora["target_modules"]}")
        if ((start.config["use_rslora"] == true) != (lora["use_rslora"] == true)) mismatch("use_rslora differs")
        for (p in trainable) {
            val t = start.tensors[p["peft_name"]] ?: mismatch("missing ${p["peft_name"]}")
            if (!t.shape.contentEquals(shape(p))) mismatch("${p["peft_name"]} is $t, expected ${shape(p).toList()}")
        }
        if (start.tensors.size != trainable.size) mismatch("${start.tensors.size} tensors, the artifacts train ${trainable.size}")
    }

    private class Sample(val ids: LongArray, val labels: LongArray)

    private fun samples(): Pair<List<Sample>, List<Sample>> {
        val train = ArrayList<Sample>()
        val test = ArrayList<Sample>()
        dataFile.forEachLine { line ->
            if (line.isBlank()) return@forEachLine
            val m = Json.parseObject(line)
            val ids = (m["input_ids"] as List<*>).map { (it as Number).toLong() }.toLongArray()
            val labels = (m["labels"] as List<*>).map { (it as Number).toLong() }.toLongArray()
            require(ids.size == labels.size) { "sample with ${ids.size} tokens but ${labels.size} labels" }
            (if (m["test"] == true) test else train).add(Sample(ids, labels))
        }
        require(train.isNotEmpty()) { "no training samples in $dataFile" }
        return train to test
    }

    private fun batch(items: List<Sample>, maxLen: Int): Map<String, OnnxTensor> {
        val len = minOf(maxLen, items.maxOf { it.ids.size })
        val ids = LongArray(items.size * len)
        val mask = LongArray(items.size * len)
        val labels = LongArray(items.size * len) { -100 }
        items.forEachIndexed { b, s ->
            for (i in 0 until minOf(len, s.ids.size)) {
                ids[b * len + i] = s.ids[i]; mask[b * len + i] = 1; labels[b * len + i] = s.labels[i]
            }
        }
        val shape = longArrayOf(items.size.toLong(), len.toLong())
        return mapOf(
            "input_ids" to OnnxTensor.createTensor(env, LongBuffer.wrap(ids), shape),
            "attention_mask" to OnnxTensor.createTensor(env, LongBuffer.wrap(mask), shape),
            "labels" to OnnxTensor.createTensor(env, LongBuffer.wrap(labels), shape),
        )
    }

    private fun loss(result: ai.onnxruntime.OrtSession.Result): Double =
        (result.get(0) as OnnxTensor).floatBuffer.get(0).toDouble()

    override fun train(start: Adapter, finetune: Map<String, Any>): Trainer.Result {
        check(start)
        val t0 = System.nanoTime()
        fun num(k: String, d: Double) = (finetune[k] as? Number)?.toDouble() ?: d
        val maxSteps = num("max_steps", 12.0).toInt()
        val batchSize = num("batch_size", 2.0).toInt()
        val maxLen = num("max_seq_len", 128.0).toInt()
        val evalEvery = maxOf(1, num("eval_every", 2.0).toInt())
        val patience = num("patience", 3.0).toInt()
        val target = (finetune["target_loss"] as? Number)?.toDouble()
        val (train, test) = samples()
        val optimizer = artifacts.listFiles { f -> f.name.startsWith("optimizer") && f.name.endsWith(".onnx") }?.sorted()?.firstOrNull()
            ?: throw IllegalStateException("no optimizer_*.onnx in $artifacts")
        val session: OrtTrainingSession = env.createTrainingSession(
            File(artifacts, "nominal_checkpoint").path, File(artifacts, "training_model.onnx").path,
            File(artifacts, "eval_model.onnx").path, optimizer.path,
        )
        session.use {
            // 1. every parameter from base_weights.bin, memory-mapped (no copy on the Java side; ORT copies it in);
            //    this also ends the checkpoint's "nominal" state. 2. this pLLM's LoRA values (trainable only).
            val total = (manifest["num_parameters"] as Number).toLong()
            RandomAccessFile(File(artifacts, "base_weights.bin"), "r").channel.use { ch ->
                val mapped = ch.map(FileChannel.MapMode.READ_ONLY, 0, total * 4).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
                OrtParams.load(session, mapped, trainableOnly = false)
            }
            val numTrainable = (manifest["num_trainable"] as Number).toInt()
            val loraValues = ByteBuffer.allocateDirect(numTrainable * 4).order(ByteOrder.nativeOrder()).asFloatBuffer()
            for (p in trainable) {
                loraValues.position((p["trainable_offset"] as Number).toInt())
                loraValues.put(start.tensors[p["peft_name"]]!!.toFloats())
            }
            loraValues.rewind()
            OrtParams.load(session, loraValues, trainableOnly = true)
            session.setLearningRate(num("lr", 3e-3).toFloat())

            val rng = java.util.Random(num("seed", 0.0).toLong())
            val order = train.indices.toMutableList()
            var cursor = order.size
            fun evalLoss(): Double? = if (test.isEmpty()) null else test.chunked(maxOf(batchSize, 4)).map { b ->
                batch(b, maxLen).let { inputs -> session.evalStep(inputs).use { loss(it) }.also { inputs.values.forEach(OnnxTensor::close) } } * b.size
            }.sum() / test.size
            val startLoss = evalLoss()
            var best = startLoss ?: Double.MAX_VALUE
            var final = startLoss
            var sinceBest = 0
            var steps = 0
            var tokens = 0L
            var stop = "max_steps"
            val trainStart = System.nanoTime()
            while (steps < maxSteps) {
                val items = (0 until batchSize).map {
                    if (cursor >= order.size) { order.shuffle(rng); cursor = 0 }
                    train[order[cursor++]]
                }
                batch(items, maxLen).let { inputs ->
                    session.trainStep(inputs).close()
                    inputs.values.forEach(OnnxTensor::close)
                }
                session.optimizerStep()
                session.lazyResetGrad()
                steps++
                tokens += items.sumOf { minOf(it.ids.size, maxLen) }
                if (steps % evalEvery == 0) {
                    final = evalLoss()
                    val l = final ?: continue
                    if (l < best) { best = l; sinceBest = 0 } else sinceBest++
                    if (target != null && l <= target) { stop = "target"; break }
                    if (sinceBest >= patience) { stop = "patience"; break }
                }
            }
            val trainSeconds = (System.nanoTime() - trainStart) / 1e9
            val buffer = OrtParams.read(session, trainableOnly = true)
            val tensors = LinkedHashMap<String, NdArray>()
            for (p in trainable) {
                val s = shape(p)
                val off = (p["trainable_offset"] as Number).toInt()
                tensors[p["peft_name"] as String] = NdArray.ofFloats(s, buffer.copyOfRange(off, off + numel(s).toInt()))
            }
            val metrics = linkedMapOf<String, Any>(
                "steps" to steps.toDouble(), "seconds" to (System.nanoTime() - t0) / 1e9, "train_seconds" to trainSeconds,
                "samples_consumed" to (steps * batchSize).toDouble(), "tokens_trained" to tokens.toDouble(),
                "n_train" to train.size.toDouble(), "n_test" to test.size.toDouble(),
                "reached_target" to if (stop == "target") 1.0 else 0.0, "ort_android" to 1.0,
            )
            startLoss?.let { metrics["start_loss"] = it }
            if (best != Double.MAX_VALUE) metrics["best_test_loss"] = best
            final?.let { metrics["final_test_loss"] = it }
            return Trainer.Result(Adapter(start.config, tensors, start.baseFingerprint), metrics, stop)
        }
    }

    override fun close() {}
}
