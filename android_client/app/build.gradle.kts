plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.xpertfl.app"
    compileSdk = 34
    defaultConfig {
        applicationId = "dev.xpertfl.app"
        minSdk = 26 // java.time, java.util.Base64, EC secp384r1 in the platform provider
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
        externalNativeBuild { cmake { arguments += listOf("-DORT_AAR_DIR=${layout.buildDirectory.get()}/ort-aar") } }
    }
    sourceSets["main"].java.srcDirs(
        "src/main/java",
        "../lib/src/main/java",   // the JVM library: Fleet client, object trees, XPerT device logic
        "../build/gen",           // Flower protobuf classes (make -C android_client proto)
    )
    externalNativeBuild { cmake { path = file("src/main/cpp/CMakeLists.txt") } }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_11
        targetCompatibility = JavaVersion.VERSION_11
    }
    kotlinOptions { jvmTarget = "11" }
    packaging { jniLibs { useLegacyPackaging = false } }
}

// The JNI shim (src/main/cpp) links against libonnxruntime.so and includes the C training API
// headers from the ORT AAR: unpack the AAR once into build/ort-aar before the native build.
val ortAar by configurations.creating
dependencies {
    ortAar("com.microsoft.onnxruntime:onnxruntime-training-android:1.19.2@aar")
}
val unpackOrtAar by tasks.registering(Copy::class) {
    from({ ortAar.map { zipTree(it) } })
    into(layout.buildDirectory.dir("ort-aar"))
}
tasks.matching { it.name.startsWith("configureCMake") || it.name.startsWith("buildCMake") }.configureEach { dependsOn(unpackOrtAar) }

dependencies {
    implementation("com.microsoft.onnxruntime:onnxruntime-training-android:1.19.2")
    implementation("com.google.protobuf:protobuf-java:3.21.12") // = the protoc (Debian 3.21.12) that generated build/gen
    implementation("androidx.work:work-runtime-ktx:2.9.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.core:core-ktx:1.13.1")
}
